"""Trainable/frozen split of the parameter tree (design decision 3).

A config lists regular expressions over '/'-joined parameter paths; `partition` returns two
trees holding every parameter exactly once. Gradients and optimizer state exist only for the
trainable tree; the frozen towers (ViT, LLM) are passed to the step as constants.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax
from flax import traverse_util

from blip2_jax.errors import UnknownName
from blip2_jax.models import lora, quantization

Tree = Any

# What trains in each stage (spec §3.6, §5, §9). `post_layernorm` is LAVIS's ln_vision: trainable
# although the ViT is frozen.
PRESETS: dict[str, tuple[str, ...]] = {
    # Stage 1 (Blip2Stage1): the whole Q-Former with its text side, heads and temperature.
    "stage1": (r"^qformer/", r"^query_tokens$", r"^embeddings/", r"^vision_projection/", r"^text_projection/",
               r"^itm_head/", r"^cls/", r"^temp$", r"^vision_model/post_layernorm/"),
    # Stage 2 (Blip2ForConditionalGeneration): Q-Former query path, queries, projection, ln_vision.
    "stage2": (r"^qformer/", r"^query_tokens$", r"^language_projection/", r"^vision_model/post_layernorm/"),
    # The demo's text-only pretraining of the LLM that stage 2 then freezes (objectives/lm.py).
    "lm": (r"^language_model/",),
    # Fine-tuning (caption / retrieval, spec §9.1): the ViT trains too; the LLM stays frozen.
    "finetune_stage1": (r"^(?!language_model/).*",),
    "finetune_stage2": (r"^(?!language_model/).*",),
}


def _flat(tree: Tree) -> dict[str, Any]:
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def _unflat(flat: dict[str, Any]) -> Tree:
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def patterns_for(spec: str | Sequence[str]) -> tuple[str, ...]:
    """A preset name or an explicit sequence of path regexes."""
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise UnknownName(f"unknown trainable preset {spec!r}; known: {sorted(PRESETS)}")
        return PRESETS[spec]
    return tuple(spec)


def is_trainable(path: str, patterns: Sequence[str]) -> bool:
    return any(re.search(p, path) for p in patterns)


def partition(params: Tree, patterns: Sequence[str]) -> tuple[Tree, Tree]:
    """(trainable, frozen): the leaves whose path matches one of `patterns`, and the rest.

    Works on any nested-dict tree (arrays, boxed `nn.Partitioned`, shardings, shapes). LoRA's
    constants (`lora_scaling`, `lora_dropout`) are frozen whatever the patterns say.
    """
    flat = _flat(params)
    trainable = {k: v for k, v in flat.items() if is_trainable(k, patterns) and not lora.is_constant(k)}
    if not trainable:
        raise ValueError(f"no parameter matches the trainable patterns {list(patterns)}")
    return _unflat(trainable), _unflat({k: v for k, v in flat.items() if k not in trainable})


def merge(trainable: Tree, frozen: Tree) -> Tree:
    """The inverse of `partition`."""
    flat = _flat(frozen)
    overlap = set(flat) & set(_flat(trainable))
    if overlap:
        raise ValueError(f"parameters both trainable and frozen: {sorted(overlap)[:5]}")
    flat.update(_flat(trainable))
    return _unflat(flat)


def cast_frozen(frozen: Tree, dtype: Any) -> Tree:
    """The frozen tree (arrays or `jax.ShapeDtypeStruct`s) stored in `dtype`, but for the leaves
    that keep theirs (`quantization.keeps_dtype`)."""
    def cast(path: str, leaf: Any) -> Any:
        if quantization.keeps_dtype(path, leaf.dtype):
            return leaf
        if isinstance(leaf, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(leaf.shape, dtype, sharding=leaf.sharding)
        return leaf.astype(dtype)
    return _unflat({k: cast(k, v) for k, v in _flat(frozen).items()})
