"""WebDataset tar shards (img2dataset's layout: `key.jpg`, `key.txt`, `key.json` one after another)
as a random-access source, so the Grain pipeline shuffles, shards over hosts, resumes and skips
bad records over them exactly as over every other source.

At start-up each shard's member headers are read once (tar headers only: the data is seeked over;
16 shards at a time) into an index of (shard, key, member offsets); a record then reads its members
with one seek each.
A record is a key's consecutive members: the image from the first image extension, the caption from
`.txt`, else the `.json` field `caption`, and every `.json` field besides. Paths are local files or
anything `etils.epath` opens (`gs://`, `s3://`), with brace patterns such as `{00000..01023}.tar`.

A member cut off by a truncated shard stays in the index and fails when read, so the pipeline skips
and counts it; a shard cut inside a header ends there, with a warning naming it.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import re
import tarfile
import threading
from typing import Any, BinaryIO, Sequence

from absl import logging

from blip2_jax.errors import InputNotFound, UserError

INDEX_THREADS = 16  # shards whose headers are read at once
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_BRACES = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """`a{00000..00002}.tar` -> a00000.tar, a00001.tar, a00002.tar (widths kept); `{x,y}` -> x, y."""
    match = _BRACES.search(pattern)
    if not match:
        return [pattern]
    body = match.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        lo, hi = numeric.groups()
        if int(hi) < int(lo):
            raise UserError(f"{pattern}: the range {{{body}}} runs backwards")
        options = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [p for option in options for p in expand_braces(head + option + tail)]


def existing_paths(patterns: str | Sequence[str], what: str, example: str) -> list[str]:
    """The files of comma-free `patterns` (brace-expanded), every one checked to exist (locally or
    through `etils.epath`) before any is read."""
    from etils import epath  # pylint: disable=import-outside-toplevel

    patterns = [p for p in ([patterns] if isinstance(patterns, str) else patterns) if p]
    paths = [path for pattern in patterns for path in expand_braces(pattern)]
    if not paths:
        raise UserError(f"data.path: no {what} given (e.g. {example})")
    missing = [p for p in paths if not epath.Path(p).exists()]
    if missing:
        raise InputNotFound(f"{what} not found: {', '.join(missing[:3])}"
                            + (f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""))
    return paths


def _open(path: str) -> BinaryIO:
    from etils import epath  # pylint: disable=import-outside-toplevel  # gs:// and s3:// as well as files

    return epath.Path(path).open("rb")


@dataclasses.dataclass(frozen=True)
class _Member:
    extension: str
    offset: int  # of its data in the shard
    size: int


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset's key and extension: the key is the path up to the first dot of the file name."""
    directory, _, base = name.rpartition("/")
    key, _, extension = base.partition(".")
    return (f"{directory}/{key}" if directory else key), extension.lower()


def _index_shard(path: str) -> list[tuple[str, dict[str, _Member]]]:
    """(key, its members by extension) for each key of one shard, in order."""
    samples: list[tuple[str, dict[str, _Member]]] = []
    with _open(path) as f:
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    key, extension = _split_name(info.name)
                    if not samples or samples[-1][0] != key:
                        samples.append((key, {}))
                    samples[-1][1][extension] = _Member(extension, info.offset_data, info.size)
        except (tarfile.ReadError, EOFError) as e:
            if not samples:
                raise UserError(f"{path}: not a readable tar shard ({e})") from e
            logging.warning("%s: cut off after %d samples (%s); the rest of the shard is skipped", path,
                            len(samples), e)
    return samples


class WebDatasetSource:
    """The samples of tar shards, in shard order then member order; ids are `<shard name>:<key>`."""

    def __init__(self, patterns: str | Sequence[str], caption_field: str = "caption"):
        self.paths = existing_paths(patterns, "WebDataset shards", "/data/laion/{00000..00099}.tar")
        self.caption_field = caption_field
        with concurrent.futures.ThreadPoolExecutor(INDEX_THREADS) as pool:  # remote shards: requests overlap
            indexes = list(pool.map(_index_shard, self.paths))
        self._index = [(shard, key, members) for shard, index in enumerate(indexes) for key, members in index]
        self._local = threading.local()  # Grain reads with several threads: each seeks its own file objects

    def __getstate__(self) -> dict[str, Any]:  # Grain's worker processes open their own files
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _local=threading.local())

    def __len__(self) -> int:
        return len(self._index)

    def _read(self, shard: int, member: _Member) -> bytes:
        files = self._local.__dict__.setdefault("files", {})
        f = files.get(shard)
        if f is None:
            f = files[shard] = _open(self.paths[shard])
        f.seek(member.offset)
        data = f.read(member.size)
        if len(data) != member.size:
            raise ValueError(f"{self.paths[shard]} is truncated: a member of {member.size} bytes has {len(data)}")
        return data

    def record_id(self, index: int) -> str:
        """`<shard file name>:<key>`, known from the index: a record that fails to read is named by it."""
        shard, key, _ = self._index[index]
        return f"{self.paths[shard].rsplit('/', 1)[-1]}:{key}"

    def __getitem__(self, index: int) -> dict[str, Any]:
        shard, key, members = self._index[index]
        record: dict[str, Any] = {"id": self.record_id(index), "key": key}
        if "json" in members:
            try:
                fields = json.loads(self._read(shard, members["json"]))
            except json.JSONDecodeError as e:
                raise ValueError(f"{record['id']}.json is not JSON: {e}") from e
            if isinstance(fields, dict):
                record.update({k: v for k, v in fields.items() if k not in ("id", "image")})
        if "txt" in members:
            record["caption"] = self._read(shard, members["txt"]).decode("utf-8", errors="replace")
        elif self.caption_field != "caption" and self.caption_field in record:
            record["caption"] = record[self.caption_field]
        image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
        if image is None:
            raise ValueError(f"{record['id']} has no image member (one of .{', .'.join(IMAGE_EXTENSIONS)}); it has "
                             f".{', .'.join(sorted(members))}")
        record["image"] = self._read(shard, image)
        return record
