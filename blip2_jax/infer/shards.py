"""The output of `blip2-jax infer`: the records in fixed shards of `shard_size`, each written whole
or not at all (a temporary file renamed into place), so a killed run continues at the first
shard it did not write and its output is byte for byte that of an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable

TMP_SUFFIX = ".partial"


@dataclasses.dataclass(frozen=True)
class Shards:
    out: Path
    count: int  # records
    shard_size: int
    suffix: str  # the data file's, e.g. ".parquet"

    def __len__(self) -> int:
        return -(-self.count // self.shard_size)

    def rows(self, k: int) -> range:
        return range(k * self.shard_size, min((k + 1) * self.shard_size, self.count))

    def path(self, k: int, suffix: str | None = None) -> Path:
        return self.out / f"shard-{k:05d}-of-{len(self):05d}{self.suffix if suffix is None else suffix}"

    def done(self, k: int) -> bool:
        """Written whole: its data file is in place (renamed last, after its companions)."""
        return self.path(k).is_file()

    def clear_partial(self) -> None:
        """Remove what a killed run left half-written."""
        for leftover in self.out.glob(f"*{TMP_SUFFIX}"):
            leftover.unlink()


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` then rename `tmp` to `path`: a reader sees the whole file or none."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    write(tmp)
    os.replace(tmp, path)
