"""The Grain input pipeline: source -> this host's shard -> shuffle -> repeat -> process -> batch.

Each host reads only the indices `process_index::process_count` of every source, so the hosts'
shards are disjoint and together are the data set; each builds batches of
`global_batch_size // process_count` rows, and the trainer assembles the global batch from them.

Determinism is what makes a resumed run continue the exact loss curve: the shuffle is Grain's
seeded index permutation (reseeded every epoch), and `process(record, rng)` gets a numpy Generator
seeded by (seed, source number, epoch, record index), independent of host count, thread or worker
scheduling. The iterator's state (`get_state()`, a JSON-serialisable dict) is Grain's read position
plus the bad-record counters; `set_state` on a fresh pipeline yields exactly the batches the
uninterrupted one would have.

A record whose reading or processing raises (missing or corrupt image, empty caption, ...) is
skipped, counted and logged; `strict=True` raises `BadRecordError` on the first one instead. A
source none of whose records can be used (a wrong image root, an unmounted bucket) is an error, not
an endless stream of skips: `make_pipeline` first reads records spread over each source until one
works, and the iterator stops after `max_bad_in_a_row` consecutive skips, naming the first failures.
"""
from __future__ import annotations

import collections
import ctypes
import dataclasses
import os
from typing import Any, Callable, Iterator, Sequence

import grain
import numpy as np
from absl import logging

from blip2_jax.data.sources import BALANCES, Record, Source
from blip2_jax.errors import UserError

Example = dict[str, np.ndarray]
Process = Callable[[Record, np.random.Generator], Example]
M_ARENA_MAX = -8  # glibc mallopt parameter


def limit_malloc_arenas(count: int = 2) -> bool:
    """Cap glibc's malloc arenas for the rest of the process (unless MALLOC_ARENA_MAX is set).

    Grain's prefetch threads each get their own arena, and freed batch-sized buffers scattered over
    them are not returned: the process's memory climbs for thousands of batches (measured +130 MiB
    over 4,000 batches of 224 px images at the default, flat after warm-up with 2 arenas). Call it
    before building pipelines; the `blip2-jax` command does. Returns whether the cap was applied.
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, count))
    except OSError:  # not glibc (macOS, musl): nothing to cap
        return False


class BadRecordError(UserError):
    """A record that could not be read or processed (raised in strict mode)."""


@dataclasses.dataclass(frozen=True)
class Mixture:
    """Sources drawn in proportion to `weights` (LAVIS's per-data-set sample ratios). Without them,
    `balance` 'size' draws in proportion to the sources' sizes, LAVIS's own behaviour (it
    concatenates its training sets, e.g. COCO + VG captions, spec §9.2); 'sqrt' in proportion to
    their square roots, InstructBLIP's balancing of its instruction-tuning sets (Dai et al. 2023):
    large sets no longer drown small ones, nor are small ones repeated as often as large ones."""

    sources: Sequence[Source]
    weights: Sequence[float] | None = None
    balance: str = "size"
    scales: Sequence[float] | None = None  # times the balanced proportions (not with weights)

    def __post_init__(self):
        if not self.sources:
            raise ValueError("a Mixture needs at least one source")
        if self.weights is not None and (len(self.weights) != len(self.sources) or min(self.weights) <= 0):
            raise ValueError(f"Mixture weights must be {len(self.sources)} positive numbers, got {self.weights}")
        if self.balance not in BALANCES:
            raise ValueError(f"a Mixture's balance is one of {', '.join(BALANCES)}, got {self.balance!r}")
        if self.scales is not None and (len(self.scales) != len(self.sources) or min(self.scales) <= 0
                                        or self.weights is not None):
            raise ValueError(f"Mixture scales must be {len(self.sources)} positive numbers and come without "
                             f"weights, got {self.scales} (weights {self.weights})")

    def proportions(self) -> list[float]:
        if self.weights is not None:
            return list(self.weights)
        scales = self.scales or [1.0] * len(self.sources)
        return [float(len(s)) ** (0.5 if self.balance == "sqrt" else 1.0) * k for s, k in zip(self.sources, scales)]


@dataclasses.dataclass(frozen=True)
class _Skipped:
    """Stands in for a bad record so that it can be counted in the main process (workers can't)."""

    record_id: str
    cause: str


@dataclasses.dataclass(frozen=True)
class _ReadAndProcess:
    """The per-record map: a top-level picklable object, as worker processes need."""

    source: Source
    process: Process
    seed: int
    source_number: int
    epoch_length: int
    strict: bool

    def __call__(self, position: int, index: int) -> tuple[str, Example] | _Skipped:
        named = getattr(self.source, "record_id", None)  # a source that names a record it cannot read
        record_id, image = named(index) if named else f"{type(self.source).__name__}[{index}]", None
        try:
            record = self.source[index]
            record_id, image = str(record.get("id", record_id)), record.get("image")
            rng = np.random.default_rng([self.seed, self.source_number, position // self.epoch_length, index])
            return record_id, self.process(record, rng)
        except Exception as e:  # pylint: disable=broad-except  # any bad record is skipped, by design
            where = f" (image {image})" if isinstance(image, str) else ""
            cause = f"{type(e).__name__}: {e}"
            if self.strict:
                raise BadRecordError(f"bad record {record_id}{where}: {cause}") from e
            return _Skipped(record_id, f"{cause}{where}")


def _describe(skipped: Sequence[_Skipped]) -> str:
    return "; ".join(f"{s.record_id}: {s.cause}" for s in skipped[:3])


def check_readable(source: Source, source_number: int, process: Process, seed: int, tries: int = 32) -> None:
    """Raise `BadRecordError` unless one of up to `tries` records spread evenly over `source` reads
    and processes: a source whose every record fails (a wrong image root, say) would otherwise
    skip forever. Costs one record when the first one works."""
    read = _ReadAndProcess(source, process, seed, source_number, max(len(source), 1), strict=False)
    failures = []
    for index in sorted(set(np.linspace(0, len(source) - 1, min(tries, len(source))).astype(int).tolist())):
        result = read(0, index)
        if not isinstance(result, _Skipped):
            return
        failures.append(result)
    if failures:
        raise BadRecordError(f"source {source_number} ({type(source).__name__}, {len(source)} records): none of "
                             f"the {len(failures)} records tried could be used; the first: {_describe(failures)}")


class BatchIterator:
    """Fixed-shape numpy batches of this host's rows, with a saveable position and bad-record stats."""

    def __init__(self, records: grain.IterDataset, batch_size: int, keep_skipped_ids: int, max_bad_in_a_row: int):
        self._iterator = iter(records)
        self.batch_size = batch_size
        self._keep = keep_skipped_ids
        self._max_bad_in_a_row = max_bad_in_a_row
        self._bad_run: list[_Skipped] = []  # the current streak of skips, for the error if it gets too long
        self.skipped = 0
        self.skipped_ids: collections.deque[str] = collections.deque(maxlen=keep_skipped_ids)

    def __iter__(self) -> Iterator[Example]:
        return self

    def __next__(self) -> Example:
        rows: list[tuple[str, Example]] = []
        while len(rows) < self.batch_size:  # StopIteration at the end drops the partial batch
            item = next(self._iterator)
            if isinstance(item, _Skipped):
                self.skipped += 1
                self.skipped_ids.append(item.record_id)
                logging.log_first_n(logging.WARNING, "skipped bad record %s: %s", 100, item.record_id, item.cause)
                self._bad_run.append(item)
                if len(self._bad_run) >= self._max_bad_in_a_row:
                    raise BadRecordError(f"{len(self._bad_run)} records in a row could not be used, the data is "
                                         f"not readable; the first: {_describe(self._bad_run)}")
            else:
                rows.append(item)
                self._bad_run = []
        return _stack(rows)

    @property
    def stats(self) -> dict[str, Any]:
        """For the trainer's logs: how many records were skipped so far and the last ids."""
        return {"skipped": self.skipped, "skipped_ids": list(self.skipped_ids)}

    def get_state(self) -> dict[str, Any]:
        return {"grain": self._iterator.get_state(), **self.stats}

    def set_state(self, state: dict[str, Any]) -> None:
        self._iterator.set_state(state["grain"])
        self.skipped = int(state["skipped"])
        self.skipped_ids = collections.deque(state["skipped_ids"], maxlen=self._keep)

    def close(self) -> None:
        """Stop worker processes and prefetch threads."""
        if hasattr(self._iterator, "close"):
            self._iterator.close()


def _stack(rows: list[tuple[str, Example]]) -> Example:
    first_id, first = rows[0]
    batch = {}
    for key in first:
        for record_id, example in rows:
            if key not in example or np.shape(example[key]) != np.shape(first[key]):
                raise BadRecordError(f"processing must give fixed shapes: record {record_id} has {key!r} "
                                     f"{np.shape(example.get(key))}, record {first_id} has {np.shape(first[key])}")
        batch[key] = np.stack([example[key] for _, example in rows])
    return batch


def _host_records(source: Source, source_number: int, *, process: Process, seed: int, shuffle: bool,
                  num_epochs: int | None, process_index: int, process_count: int, strict: bool) -> grain.MapDataset:
    indices = grain.MapDataset.range(len(source))[process_index::process_count]
    if len(indices) == 0:
        raise ValueError(f"source {source_number} ({type(source).__name__}) has {len(source)} records, "
                         f"too few for {process_count} hosts")
    if shuffle:
        indices = indices.shuffle(seed=seed + source_number)
    read = _ReadAndProcess(source, process, seed, source_number, len(indices), strict)
    return indices.repeat(num_epochs).map_with_index(read)


def make_pipeline(source: Source | Mixture, *, process: Process, global_batch_size: int, seed: int,
                  shuffle: bool = True, num_epochs: int | None = None, process_index: int = 0,
                  process_count: int = 1, worker_count: int = 0, strict: bool = False,
                  keep_skipped_ids: int = 32, read_threads: int = 16, prefetch_batches: int = 2,
                  max_bad_in_a_row: int = 1000) -> BatchIterator:
    """This host's batches of `source` (or a `Mixture`), each `global_batch_size // process_count`
    rows of `process(record, rng)`. `num_epochs=None` repeats forever; with a mixture, iteration
    ends when the first source runs out. `worker_count > 0` reads and processes in that many
    worker processes (then `process` and the sources must pickle). `read_threads` threads read and
    process ahead of the consumer, at most `prefetch_batches` batches ahead: Grain's default of 500
    records holds ~300 MB of 224 px float32 images and fills slowly, which looks like a leak. With
    `read_threads=0` the consumer's own thread reads each batch when asked: the same batches and
    positions, without Grain's per-record thread hand-offs (which cost more than the demo's records).
    Each source must have a usable record (`check_readable`, before any thread starts), and
    `max_bad_in_a_row` consecutive skipped records end the iteration with `BadRecordError`."""
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} is not divisible by {process_count} processes")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if max_bad_in_a_row < 1:
        raise ValueError(f"max_bad_in_a_row must be >= 1, got {max_bad_in_a_row}")
    mixture = source if isinstance(source, Mixture) else Mixture([source])
    for i, s in enumerate(mixture.sources):
        check_readable(s, i, process, seed)
    parts = [_host_records(s, i, process=process, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                           process_index=process_index, process_count=process_count, strict=strict)
             for i, s in enumerate(mixture.sources)]
    records = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, mixture.proportions())
    local = global_batch_size // process_count
    records = records.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                                        prefetch_buffer_size=prefetch_batches * local))
    if worker_count > 0:
        records = records.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return BatchIterator(records, local, keep_skipped_ids, max_bad_in_a_row)
