"""A batch's schema as plain values: each key -> the shape of one row and its dtype.

Each objective states the batch it reads (`objectives/stage1.py`, `stage2.py`, `lm.py`:
`batch_spec`), from the model's sizes and the run's text lengths. The trainer hands the spec to the
data side as a value (`data/` imports no objective): synthetic rows are built to it
(`synthetic.py`), each processed record keeps exactly its keys (`loader.RecordProcessor`), and the
step is compiled against it (`train/layout.py::Layout.batch_abstract`), so a run with optional
inputs (ITC positives, an LM context) compiles, plans and loads the same batch. A row that
disagrees is refused with the key, the shape and the dtype.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import numpy as np


class Field(NamedTuple):
    shape: tuple[int, ...]  # one row's
    dtype: np.dtype


BatchSpec = Mapping[str, Field]


def field(shape: tuple[int, ...], dtype: Any) -> Field:
    return Field(tuple(int(d) for d in shape), np.dtype(dtype))


def describe(spec: BatchSpec) -> str:
    return ", ".join(f"{k} {f.dtype}{list(f.shape)}" for k, f in spec.items())


def conform(row: Mapping[str, Any], spec: BatchSpec, where: str) -> dict[str, np.ndarray]:
    """`row` with exactly `spec`'s keys, in its order, each of its shape and dtype; `where` names
    the row in the error (a record id, 'synthetic row 3')."""
    missing = [k for k in spec if k not in row]
    if missing:
        raise ValueError(f"{where} has no {', '.join(missing)}; the objective reads {describe(spec)}")
    out = {}
    for key, want in spec.items():
        value = np.asarray(row[key])
        if value.shape != want.shape or value.dtype != want.dtype:
            raise ValueError(f"{where}: {key} is {value.dtype}{list(value.shape)}, the objective reads "
                             f"{want.dtype}{list(want.shape)}")
        out[key] = value
    return out
