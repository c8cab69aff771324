"""Parquet files of image-text pairs (image bytes, or a path to the image, and caption columns) as a
random-access source for the Grain pipeline, like `webdataset.py` for tar shards.

The files' footers give every row group's row count: record i is (file, row group, row). A read
loads that row group's needed columns once per thread and keeps the last few (`CACHED_GROUPS`), so
reading in order costs one decode per row group; the pipeline's global shuffle jumps between row
groups, so write the files with small row groups (pyarrow's `row_group_size`, e.g. 256 rows of
images), or copy them to ArrayRecord once with `blip2-jax data build --parquet`.
"""
from __future__ import annotations

import bisect
import collections
import os
import threading
from typing import Any, Sequence

from blip2_jax.data.webdataset import existing_paths
from blip2_jax.errors import UserError

CACHED_GROUPS = 4  # row groups each read thread keeps decoded


class ParquetSource:
    """The rows of Parquet files, in file then row order; ids `<file name>:<row>` (or `id_column`).
    `image_column` holds encoded bytes (a struct with `bytes`, as Hugging Face datasets write images,
    works too) or a path (under `image_root`); `caption_column` the text; every other column is kept
    in the record."""

    def __init__(self, patterns: str | Sequence[str], *, image_column: str = "image", caption_column: str = "caption",
                 id_column: str = "", image_root: str = ""):
        import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
        from etils import epath  # pylint: disable=import-outside-toplevel

        self.paths = existing_paths(patterns, "Parquet files", "/data/pairs/{00000..00099}.parquet")
        self.image_column, self.caption_column, self.id_column = image_column, caption_column, id_column
        self.image_root = image_root
        self._groups: list[tuple[int, int, int, int]] = []  # (first record, file, row group, rows)
        count = 0
        for f, path in enumerate(self.paths):
            try:
                with epath.Path(path).open("rb") as handle:
                    parquet = pq.ParquetFile(handle)
                    meta, names = parquet.metadata, set(parquet.schema_arrow.names)
            except Exception as e:  # pylint: disable=broad-except  # pyarrow raises several kinds
                raise UserError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from e
            absent = [c for c in (image_column, caption_column, id_column) if c and c not in names]
            if absent:
                raise UserError(f"{path} has no column {' or '.join(absent)}; it has {', '.join(sorted(names))}")
            for g in range(meta.num_row_groups):
                rows = meta.row_group(g).num_rows
                self._groups.append((count, f, g, rows))
                count += rows
        self._count = count
        self._starts = [g[0] for g in self._groups]
        self._file_first = {}
        for first, f, _, _ in self._groups:
            self._file_first.setdefault(f, first)
        self._local = threading.local()

    def __getstate__(self) -> dict[str, Any]:  # Grain's worker processes keep their own caches
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _local=threading.local())

    def __len__(self) -> int:
        return self._count

    def _locate(self, index: int) -> tuple[int, int, int, int]:
        """(file, row group, row within it, row within the file)."""
        first, f, g, _ = self._groups[bisect.bisect_right(self._starts, index) - 1]
        return f, g, index - first, index - self._file_first[f]

    def record_id(self, index: int) -> str:
        f, _, _, row = self._locate(index)
        return f"{self.paths[f].rsplit('/', 1)[-1]}:{row}"

    def _row_group(self, f: int, g: int) -> list[dict[str, Any]]:
        import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
        from etils import epath  # pylint: disable=import-outside-toplevel

        cache: collections.OrderedDict = self._local.__dict__.setdefault("groups", collections.OrderedDict())
        if (f, g) not in cache:
            with epath.Path(self.paths[f]).open("rb") as handle:
                cache[(f, g)] = pq.ParquetFile(handle).read_row_group(g).to_pylist()
            while len(cache) > CACHED_GROUPS:
                cache.popitem(last=False)
        cache.move_to_end((f, g))
        return cache[(f, g)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        f, g, row, _ = self._locate(index)
        fields = dict(self._row_group(f, g)[row])
        image = fields.pop(self.image_column)
        if isinstance(image, dict):  # Hugging Face datasets' Image feature: {"bytes", "path"}
            image = image.get("bytes") or image.get("path")
        if image is None:
            raise ValueError(f"{self.record_id(index)}: the {self.image_column} column is empty")
        if isinstance(image, str) and self.image_root:
            image = os.path.join(self.image_root, image)
        record = {**fields, "image": image, "caption": fields.get(self.caption_column)}
        record["id"] = str(fields[self.id_column]) if self.id_column else self.record_id(index)
        return record
