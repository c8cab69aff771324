"""Streaming safetensors: read one tensor at a time through a memory map, write a shard from a
header planned up front and tensors produced one at a time.

The format is an 8-byte little-endian header length, a JSON header (`name -> dtype, shape,
data_offsets`, plus `__metadata__`), then the raw little-endian bytes. Reading it ourselves (not
through `safetensors.numpy`) keeps memory at one tensor, handles bfloat16 through `ml_dtypes`,
and lets every file be checked against its header before any tensor is used: a truncated or
corrupt shard is named with the bytes it should have.
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np

from blip2_jax.errors import InputNotFound

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_CODES = {np.dtype(v): k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and byte range after the header."""

    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def dtype_code(dtype: np.dtype) -> str:
    dtype = np.dtype(dtype)
    if dtype not in _CODES:
        raise ValueError(f"safetensors cannot store dtype {dtype}")
    return _CODES[dtype]


def read_header(file: str | os.PathLike) -> tuple[dict[str, TensorInfo], int]:
    """(name -> TensorInfo, data offset) of `file`, checked against its size."""
    file = Path(file)
    if not file.is_file():
        raise InputNotFound(f"checkpoint shard {file} not found")
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{file} is not a safetensors file: {size} bytes, shorter than its 8-byte header length")
        (length,) = struct.unpack("<Q", raw)
        if length > _MAX_HEADER or 8 + length > size:
            raise ValueError(f"{file} is not a readable safetensors file (truncated or corrupt?): header of {length} "
                             f"bytes in a file of {size}")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{file} is not a readable safetensors file (corrupt header): {e}") from e
    header.pop("__metadata__", None)
    infos, end = {}, 0
    for name, entry in header.items():
        try:
            dtype = np.dtype(_DTYPES[entry["dtype"]])
            shape = tuple(int(d) for d in entry["shape"])
            start, stop = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{file}: header entry for {name!r} is malformed: {entry!r}") from e
        if stop - start != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise ValueError(f"{file}: {name} has {stop - start} bytes for shape {shape} of {dtype}")
        infos[name] = TensorInfo(file, dtype, shape, start, stop)
        end = max(end, stop)
    if size != 8 + length + end:
        raise ValueError(f"{file} is not a readable safetensors file (truncated or corrupt): {size} bytes, "
                         f"its header describes {8 + length + end}")
    return infos, 8 + length


class SafetensorsFiles(Mapping[str, np.ndarray]):
    """The tensors of one or more safetensors files as a lazy mapping: `shape(name)` reads the
    header only; `[name]` maps that tensor's bytes (a read-only view of the file, no copy)."""

    def __init__(self, files: Iterable[str | os.PathLike], expected: Mapping[str, str] | None = None):
        """`expected` (name -> file name, a sharded checkpoint's index) must match the files' headers."""
        self._infos: dict[str, TensorInfo] = {}
        self._data_offset: dict[Path, int] = {}
        for file in files:
            infos, offset = read_header(file)
            self._data_offset[Path(file)] = offset
            for name, info in infos.items():
                if name in self._infos:
                    raise ValueError(f"tensor {name} is in both {self._infos[name].file} and {file}")
                self._infos[name] = info
        if expected is not None:
            wrong = sorted(f"{n} (index: {s}, found in: {self._infos[n].file.name if n in self._infos else 'none'})"
                           for n, s in expected.items() if n not in self._infos or self._infos[n].file.name != s)
            if wrong:
                raise ValueError(f"the shards do not hold the tensors their index assigns to them: {wrong[:10]}")

    def __getitem__(self, name: str) -> np.ndarray:
        info = self._infos[name]
        offset = self._data_offset[info.file] + info.start
        if info.nbytes == 0:
            return np.zeros(info.shape, info.dtype)
        return np.memmap(info.file, dtype=info.dtype, mode="r", offset=offset, shape=info.shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._infos[name].shape


def plan_shards(tensors: Iterable[tuple[str, tuple[int, ...], np.dtype]], max_shard_bytes: int
                ) -> list[list[tuple[str, tuple[int, ...], np.dtype]]]:
    """Split (name, shape, dtype) in order into shards of at most `max_shard_bytes` (a larger
    tensor gets a shard of its own), as `save_pretrained` does."""
    shards: list[list] = [[]]
    size = 0
    for name, shape, dtype in tensors:
        nbytes = np.dtype(dtype).itemsize * int(np.prod(shape, dtype=np.int64))
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, tuple(shape), np.dtype(dtype)))
        size += nbytes
    return shards if shards[0] else []


def write_file(file: str | os.PathLike, tensors: list[tuple[str, tuple[int, ...], np.dtype]],
               produce: Callable[[str], np.ndarray], progress: Callable[[int], None] | None = None) -> None:
    """Write a safetensors file holding `tensors` (name, shape, dtype), asking `produce(name)` for
    each one in order, so only one tensor is in memory; `progress(nbytes)` after each."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}  # what transformers checks for
    offset = 0
    for name, shape, dtype in tensors:
        nbytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": dtype_code(dtype), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype in tensors:
            value = np.asarray(produce(name))
            if value.shape != shape or value.dtype != dtype:
                raise ValueError(f"{name}: produced {value.dtype}{list(value.shape)}, planned {dtype}{list(shape)}")
            f.write(np.ascontiguousarray(value).reshape(-1).view(np.uint8).data)  # little-endian hosts only
            if progress is not None:
                progress(value.nbytes)
