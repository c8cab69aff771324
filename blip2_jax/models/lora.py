"""LoRA (Hu et al. 2021) on any of the model's dense layers, as a transform of the parameter tree.

A targeted layer keeps its `kernel` W (d_in, d_out), frozen, and gains `lora_a` A (d_in, r) and
`lora_b` B (r, d_out): it computes x W + s * dropout(x) A B with s = alpha / r, as Hugging Face
PEFT's `lora.Linear` does (A is PEFT's `lora_A.weight` transposed, B its `lora_B.weight`).
`layers.Dense` applies the branch wherever the tree holds the leaves, so every path that runs the
model — training, evaluation, generation, features — runs an adapted tree unchanged. The tree is
self-describing: s and the dropout rate are leaves beside A and B (`lora_scaling`, `lora_dropout`,
constants that never train), so an adapted checkpoint needs no config to run or to export.

Targets are regular expressions searched in the '/'-joined path of a dense layer (its kernel's path
without `/kernel`, the scanned stack's path for every layer of it), the style of the trainable
partition: `language_model/.*/(q_proj|v_proj)$` adapts the LLM's query and value projections.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from blip2_jax.errors import UserError
from blip2_jax.models import dense_paths

Tree = Any
A, B, SCALING, DROPOUT = "lora_a", "lora_b", "lora_scaling", "lora_dropout"
LEAVES = (A, B, SCALING, DROPOUT)
CONSTANTS = (SCALING, DROPOUT)
# the adapters' leaves: what a LoRA run trains besides its partition's trainables
TRAINABLE_PATTERNS = (rf"/{A}$", rf"/{B}$")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank 0: no adapters. `targets`: regexes over dense-layer paths (see the module docstring)."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))  # a list read back from JSON
        if self.rank < 0 or not 0.0 <= self.dropout < 1.0:
            raise UserError(f"lora: rank must be >= 0 and 0 <= dropout < 1, got rank={self.rank}, "
                            f"dropout={self.dropout}")
        if self.rank and not self.targets:
            raise UserError(f"lora.rank={self.rank} adapts nothing: set lora.targets (regexes over dense-layer "
                            "paths, e.g. 'language_model/.*/(q_proj|v_proj)$')")
        for pattern in self.targets:
            try:
                re.compile(pattern)
            except re.error as e:
                raise UserError(f"lora.targets: {pattern!r} is not a regular expression ({e})") from e

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def is_constant(path: str) -> bool:
    """A LoRA hyperparameter leaf: stored beside the adapter, never trained, never cast."""
    return path.rpartition("/")[2] in CONSTANTS


def is_adapter_leaf(path: str) -> bool:
    return path.rpartition("/")[2] in LEAVES


def adapted_layers(paths: Iterable[str]) -> list[str]:
    """The dense layers that hold an adapter, of a flat tree's '/'-joined leaf `paths`."""
    return sorted(p[: -len(A) - 1] for p in paths if p.endswith("/" + A))


def add(params: Tree, config: LoraConfig, rng: jax.Array, dtype: Any = None) -> Tree:
    """`params` with an adapter on every targeted layer: A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) (PEFT's
    kaiming-uniform with a=sqrt(5)), B = 0, so the adapted model computes what `params` computes.
    Works on boxed (`nn.Partitioned`) trees — the adapters get the kernel's logical axes, the rank
    axis unsharded — and under `jax.eval_shape`. `dtype`: the adapters' (default: the kernel's,
    which must then be a float kernel)."""
    if not config.enabled:
        return params
    flat = traverse_util.flatten_dict(params, sep="/")
    for i, layer in enumerate(dense_paths.select(params, config.targets, "lora.targets")):
        kernel = flat[layer + "/kernel"]
        w = dense_paths.value(kernel)
        lead, (d_in, d_out) = w.shape[:-2], w.shape[-2:]
        bound = 1.0 / math.sqrt(d_in)
        kind = w.dtype if dtype is None else dtype
        a = jax.random.uniform(jax.random.fold_in(rng, i), (*lead, d_in, config.rank), kind, -bound, bound)
        leaves = {A: a, B: jnp.zeros((*lead, config.rank, d_out), kind),
                  SCALING: jnp.full(lead, config.scaling, jnp.float32),
                  DROPOUT: jnp.full(lead, config.dropout, jnp.float32)}
        if isinstance(kernel, nn.Partitioned):
            names = kernel.names
            axes = {A: (*names[:-1], None), B: (*names[:-2], None, names[-1]),
                    SCALING: names[:-2], DROPOUT: names[:-2]}
            leaves = {k: kernel.replace_boxed(v).replace(names=axes[k]) for k, v in leaves.items()}
        flat.update({f"{layer}/{k}": v for k, v in leaves.items()})
    return traverse_util.unflatten_dict(flat, sep="/")


def strip(params: Tree) -> Tree:
    """`params` without its adapters (the base model they were trained on)."""
    return traverse_util.unflatten_dict({p: v for p, v in traverse_util.flatten_dict(params, sep="/").items()
                                         if not is_adapter_leaf(p)}, sep="/")


def delta(a: Any, b: Any, scaling: Any) -> Any:
    """s * A B for one layer or a stack (leading axes broadcast), in float32."""
    xp = jnp if isinstance(a, jax.Array) else np
    s = xp.asarray(scaling, np.float32)[..., None, None]
    return s * xp.matmul(xp.asarray(a, np.float32), xp.asarray(b, np.float32))


def merged(params: Tree) -> Tree:
    """The base model with every adapter folded into its kernel: W + s A B (merged inference)."""
    flat = traverse_util.flatten_dict(params, sep="/")
    for layer in adapted_layers(flat):
        w = flat[layer + "/kernel"]
        if w.dtype == np.int8:
            raise UserError(f"{layer}: an adapter on an int8 kernel stays unmerged (merging would requantize it)")
        flat[layer + "/kernel"] = (w.astype(np.float32) + delta(*(flat[f"{layer}/{k}"] for k in (A, B, SCALING)))
                                   ).astype(w.dtype)
    return strip(traverse_util.unflatten_dict(flat, sep="/"))


def settings(shapes: Mapping[str, tuple[int, ...]], constants: Mapping[str, Any], layers: Iterable[str]
             ) -> tuple[int, float, float]:
    """(rank, scaling, dropout) shared by the adapters of `layers` (ranks from `shapes`, the rest from
    the `constants` leaves); refused if they differ: one adapter config describes them all."""
    found = {(int(shapes[f"{layer}/{A}"][-1]),
              *(tuple(np.unique(np.asarray(constants[f"{layer}/{k}"], np.float32)).tolist()) for k in CONSTANTS))
             for layer in layers}
    if len(found) != 1 or any(len(x) != 1 for x in next(iter(found))[1:]):
        raise UserError(f"the adapters differ in rank, scaling or dropout ({sorted(found)[:3]}); one PEFT "
                        "adapter config cannot describe them")
    rank, (scaling,), (dropout,) = next(iter(found))
    return rank, scaling, dropout
