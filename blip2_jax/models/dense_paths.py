"""Dense layers chosen by path: what LoRA (`lora.targets`) and int8 (`int8`) select their layers with.

A dense layer's path is its kernel's '/'-joined path without `/kernel`; a scanned stack's layer has one
path for all its layers. Patterns are regular expressions searched in it, the style of the trainable
partition (`train/partition.py`).
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np
from flax import linen as nn
from flax import traverse_util

from blip2_jax.errors import UserError


def value(leaf: Any) -> Any:
    """A leaf's array (or shape), unboxed from `nn.Partitioned`."""
    return leaf.value if isinstance(leaf, nn.Partitioned) else leaf


def select(params: Any, patterns: Sequence[str], setting: str) -> list[str]:
    """The dense layers of `params` that `patterns` select; a pattern that selects none is refused,
    naming `setting` (a mistyped target would otherwise adapt or quantize nothing, silently)."""
    flat = traverse_util.flatten_dict(params, sep="/")
    dense = [p[: -len("/kernel")] for p, leaf in flat.items()
             if p.endswith("/kernel") and len(np.shape(value(leaf))) in (2, 3)]  # not the patch conv (4-D)
    unused = [t for t in patterns if not any(re.search(t, p) for p in dense)]
    if unused:
        raise UserError(f"{setting} {unused} match no dense layer; some there are: {dense[:6]}")
    return [p for p in dense if any(re.search(t, p) for t in patterns)]
