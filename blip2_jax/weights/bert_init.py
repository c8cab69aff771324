"""Stage-1 initialisation from a pre-trained BERT (spec §3.5), as LAVIS's `init_Qformer`.

BERT's embeddings (word, position, LayerNorm), every self-attention, the text feed-forwards and
the MLM head's transform and bias load into the Q-Former; the query feed-forwards start as copies
of the text feed-forwards; cross-attention, projections, the ITM head, the query tokens and the
new [DEC] row keep their fresh initialisation. BERT's pooler, token-type table and NSP head have
no home (LAVIS discards them too); anything else unexpected is an error.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from blip2_jax.models.config import QFormerConfig
from blip2_jax.weights.hf_checkpoint import read_tensors, resolve
from blip2_jax.weights.hf_names import CheckpointMismatchError, to_numpy

# BERT tensors LAVIS drops on purpose.
_DISCARDED = re.compile(r"^(pooler\.|embeddings\.token_type_embeddings\.|embeddings\.position_ids$|"
                        r"cls\.seq_relationship\.|cls\.predictions\.decoder\.)")


def _target(name: str, config: QFormerConfig) -> tuple[tuple[str, ...], int | None] | None:
    """Our (path, stacked index) for a BERT tensor name (without the `bert.` prefix)."""
    leaf = {"weight": "kernel", "bias": "bias"}
    m = re.match(r"^embeddings\.(word|position)_embeddings\.weight$", name)
    if m:
        return ("embeddings", f"{m.group(1)}_embeddings", "embedding"), None
    m = re.match(r"^embeddings\.LayerNorm\.(weight|bias)$", name)
    if m:
        return ("qformer", "layernorm", "scale" if m.group(1) == "weight" else "bias"), None
    m = re.match(r"^cls\.predictions\.transform\.(dense|LayerNorm)\.(weight|bias)$", name)
    if m:
        kind = ("scale" if m.group(2) == "weight" else "bias") if m.group(1) == "LayerNorm" else leaf[m.group(2)]
        return ("cls", "predictions", "transform", m.group(1), kind), None
    if name == "cls.predictions.bias":
        return ("cls", "predictions", "bias"), None
    m = re.match(r"^encoder\.layer\.(\d+)\.(attention\.self|attention\.output|intermediate|output)\."
                 r"(query|key|value|dense|LayerNorm)\.(weight|bias)$", name)
    if m:
        i, block, module, kind = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        kind = ("scale" if kind == "weight" else "bias") if module == "LayerNorm" else leaf[kind]
        sub = {"attention.self": ("attention", "attention"), "attention.output": ("attention", "output"),
               "intermediate": ("intermediate",), "output": ("output",)}[block]
        group, (groups, _) = config.cross_attention_frequency, config.layer_groups
        if i >= groups * group:  # the last, shorter group: not stacked
            return ("qformer", "encoder", "remainder", f"layer_{i - groups * group}", *sub, module, kind), None
        return ("qformer", "encoder", "layers", f"layer_{i % group}", *sub, module, kind), i // group
    return None


def _layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(value.T) if path[-1] == "kernel" else value


def init_from_bert(params: Any, bert: Mapping[str, Any], config: QFormerConfig) -> Any:
    """`params` (a fresh stage-1 tree) with the BERT tensors `bert` loaded as LAVIS does.

    Vocabulary-sized tensors keep their extra rows (the [DEC] token) from `params`.
    """
    flat = {k: np.array(v) for k, v in traverse_util.flatten_dict(params).items()}
    loaded: set[tuple[tuple[str, ...], int | None]] = set()
    unknown, bad_shape = [], []
    for raw_name, tensor in bert.items():
        name = raw_name[len("bert."):] if raw_name.startswith("bert.") else raw_name
        if _DISCARDED.match(name):
            continue
        target = _target(name, config)
        if target is None or target[0] not in flat:  # also a BERT layer past the Q-Former's depth
            unknown.append(raw_name)
            continue
        path, index = target
        value = _layout(path, to_numpy(tensor).astype(flat[path].dtype))
        slot = flat[path] if index is None else flat[path][index]  # a view: writes land in `flat`
        if path[-1] == "embedding" and path[1] == "word_embeddings" or path[-2:] == ("predictions", "bias"):
            rows = value.shape[0]  # BERT's vocabulary; the rows after it ([DEC]) stay fresh
            if rows > slot.shape[0] or value.shape[1:] != slot.shape[1:]:
                bad_shape.append(f"{raw_name}: {value.shape} does not fit {slot.shape}")
                continue
            slot[:rows] = value
        elif value.shape != slot.shape:
            bad_shape.append(f"{raw_name}: shape {value.shape}, expected {slot.shape}")
            continue
        else:
            slot[...] = value
        loaded.add((path, index))
    stacked, remainder = ("qformer", "encoder", "layers"), ("qformer", "encoder", "remainder")
    expected = {(p, None) for p in flat if p[0] in ("embeddings", "cls") or p[:2] == ("qformer", "layernorm")
                or p[:3] == remainder and p[4] in ("attention", "intermediate", "output")}
    expected |= {(p, i) for p in flat if p[:3] == stacked and p[4] in ("attention", "intermediate", "output")
                 for i in range(flat[p].shape[0])}
    missing = sorted("/".join(p) + ("" if i is None else f"[group {i}]") for p, i in expected - loaded)
    if unknown or bad_shape or missing:
        lines = [f"unexpected: {sorted(unknown)}"] if unknown else []
        lines += [f"wrong shape: {bad_shape}"] if bad_shape else []
        lines += [f"not found in the BERT checkpoint: {missing}"] if missing else []
        raise CheckpointMismatchError("BERT checkpoint does not fit the Q-Former:\n  " + "\n  ".join(lines))
    for path in list(flat):  # the query FFN starts as a copy of the text FFN (LAVIS `_query` params)
        if path[:3] in (stacked, remainder) and path[4] in ("intermediate", "output"):
            flat[path[:4] + (path[4] + "_query",) + path[5:]] = flat[path].copy()
    return traverse_util.unflatten_dict(flat)


def load_bert(path_or_id: str | os.PathLike) -> Mapping[str, np.ndarray]:
    """BERT tensors from a Hugging Face directory (safetensors) or hub id (`bert-base-uncased`)."""
    return read_tensors(resolve(path_or_id))
