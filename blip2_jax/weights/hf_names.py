"""Hugging Face <-> blip2_jax parameter names and tensor layouts.

Our parameter tree mirrors the Hugging Face module tree (design decision 2), so a Hugging Face
name is our path with: scanned stacks expanded to per-layer indices, `layer_N` children of a T5
block written `layer.N`, Flax leaf names (`kernel`, `scale`, `embedding`) written `weight`, and
kernels transposed. The few names that do not follow the pattern are listed in `_SPECIAL`.
Tied tensors that Hugging Face may or may not write (OPT `lm_head`, T5 `embed_tokens`) are
aliases: accepted when equal to the tensor they alias, never required.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterator, Mapping

import numpy as np
from flax import traverse_util

from blip2_jax.errors import UserError

Tree = Any


class CheckpointMismatchError(UserError):
    """A checkpoint does not match the model; the message lists every offending tensor."""


def finite(name: str, value: np.ndarray, source: str) -> np.ndarray:
    """`value`, refused if it holds NaN or Inf: the weights of a diverged run would otherwise convert,
    load and caption (an empty caption, exit 0) as if nothing were wrong."""
    bad = value.size - int(np.count_nonzero(np.isfinite(value)))
    if bad:
        raise CheckpointMismatchError(f"{source}: {name} holds {bad} NaN or Inf values of {value.size}; a model's "
                                      "weights must be finite (was it saved from a diverged run?)")
    return value


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one Hugging Face tensor lives in our tree: leaf `path`, stacked `index` or None.
    `to_flax` returns a view (no copy), so a reader can slice one shard out of a memory map."""

    path: str
    index: int | None
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _transpose(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.T)


def _transposed(x: np.ndarray) -> np.ndarray:
    return x.T


def _conv_to_flax(x: np.ndarray) -> np.ndarray:  # torch (O, I, kh, kw) -> flax (kh, kw, I, O)
    return x.transpose(2, 3, 1, 0)


def _conv_to_hf(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1))


# Our path -> HF name, for names outside the general pattern.
_SPECIAL = {
    "encoder/relative_attention_bias/embedding": "encoder/block/0/layer/0/SelfAttention/relative_attention_bias/weight",
    "decoder/relative_attention_bias/embedding": "decoder/block/0/layer/0/SelfAttention/relative_attention_bias/weight",
}

# Hugging Face tensors that duplicate another (tied weights): (alias, canonical), relative to the
# language model's prefix; an alias applies where its canonical tensor exists. Written by some
# checkpoints, required by none.
_ALIASES = (
    ("lm_head/weight", "model/decoder/embed_tokens/weight"),  # OPT: head tied to the input embedding
    ("lm_head/weight", "model/embed_tokens/weight"),  # LLaMA with tie_word_embeddings (no lm_head of ours)
    ("encoder/embed_tokens/weight", "shared/weight"),  # T5: both stacks embed with `shared`
    ("decoder/embed_tokens/weight", "shared/weight"),
)
# A T5 checkpoint without `lm_head.weight` ties the head to `shared` (what transformers does).
_FALLBACKS = (("lm_head/weight", "shared/weight"),)


_QFORMER_GROUP = re.compile(r"^(.*?qformer/encoder)/(layers|remainder)/layer_(\d+)/(.*)$")


def _qformer_groups(flat_shapes: Mapping[str, tuple[int, ...]]) -> int:
    """How many full Q-Former layer groups the tree stacks (0 when all its layers are in the remainder)."""
    return next((shape[0] for path, shape in flat_shapes.items()
                 if (m := _QFORMER_GROUP.match(path)) and m.group(2) == "layers"), 0)


def _qformer_remainder(path: str, qformer_group: int, groups: int) -> str | None:
    """The HF path of a leaf of the Q-Former's last, shorter group (not stacked): layer groups * f + j."""
    m = _QFORMER_GROUP.match(path)
    if m is None or m.group(2) != "remainder":
        return None
    return f"{m.group(1)}/layer/{groups * qformer_group + int(m.group(3))}/{m.group(4)}"


def _split_stack(path: str, qformer_group: int) -> tuple[str, str, Callable[[int], int]] | None:
    """For a leaf inside a scanned stack: (stack prefix in HF form, rest, stacked index -> layer index)."""
    m = _QFORMER_GROUP.match(path)
    if m and m.group(2) == "layers":
        j = int(m.group(3))
        return m.group(1) + "/layer", m.group(4), lambda g: g * qformer_group + j
    m = re.match(r"^(.*?(?:^|/)(?:encoder|decoder)/block)/layer_(\d+)/(.*)$", path)
    if m:  # T5 block: layer_N child -> layer.N
        return m.group(1), f"layer/{m.group(2)}/{m.group(3)}", lambda i: i
    m = re.match(r"^(.*?(?:^|/)(?:encoder|decoder|model)/layers)/(.*)$", path)
    if m:  # ViT encoder layers, OPT decoder layers, LLaMA layers
        return m.group(1), m.group(2), lambda i: i
    return None


def hf_shape(slot: Slot, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The Hugging Face shape of the tensor at `slot` of a leaf of our `shape` (no data touched)."""
    shape = tuple(shape if slot.index is None else shape[1:])
    if slot.to_hf is _transpose:
        return shape[::-1]
    if slot.to_hf is _conv_to_hf:
        return tuple(shape[i] for i in (3, 2, 0, 1))
    return shape


def _leaf_name(rest: str, ndim: int) -> tuple[str, Callable, Callable]:
    """Rename a Flax leaf to its HF name and give the layout transforms (both directions)."""
    head, _, leaf = rest.rpartition("/")
    prefix = head + "/" if head else ""
    if leaf == "kernel":
        if ndim == 4:
            return prefix + "weight", _conv_to_flax, _conv_to_hf
        return prefix + "weight", _transposed, _transpose
    if leaf in ("scale", "embedding"):
        return prefix + "weight", _identity, _identity
    return rest, _identity, _identity


def slots(flat_shapes: Mapping[str, tuple[int, ...]], *, qformer_group: int = 2) -> dict[str, Slot]:
    """HF name -> Slot for every leaf of our tree (`flat_shapes`: '/'-joined path -> shape);
    `qformer_group` is the Q-Former's `cross_attention_frequency`."""
    out: dict[str, Slot] = {}
    groups = _qformer_groups(flat_shapes)
    for path, shape in flat_shapes.items():
        special = next((v for k, v in _SPECIAL.items() if path.endswith(k)), None)
        if special is not None:
            hf = path[: len(path) - len(next(k for k in _SPECIAL if path.endswith(k)))] + special
            out[hf.replace("/", ".")] = Slot(path, None, _identity, _identity)
            continue
        stack = _split_stack(path, qformer_group)
        if stack is None:
            name, to_flax, to_hf = _leaf_name(_qformer_remainder(path, qformer_group, groups) or path, len(shape))
            out[name.replace("/", ".")] = Slot(path, None, to_flax, to_hf)
            continue
        prefix, rest, layer_of = stack
        name, to_flax, to_hf = _leaf_name(rest, len(shape) - 1)
        for i in range(shape[0]):
            out[f"{prefix}/{layer_of(i)}/{name}".replace("/", ".")] = Slot(path, i, to_flax, to_hf)
    return out


def _lm_prefixed(table: tuple[tuple[str, str], ...], keys: set[str]) -> dict[str, str]:
    """`table` (relative to a language model) resolved against the LM prefixes present in `keys`."""
    out = {}
    for prefix in ("language_model.", ""):
        for alias, canon in table:
            a, c = prefix + alias.replace("/", "."), prefix + canon.replace("/", ".")
            if c in keys:
                out[a] = c
    return out


def flat_shapes(tree: Tree) -> dict[str, tuple[int, ...]]:
    return {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(tree).items()}


def to_numpy(t: Any) -> np.ndarray:
    """A torch tensor, jax array or numpy array as numpy (bf16 kept through ml_dtypes)."""
    if hasattr(t, "detach"):  # torch
        import torch  # pylint: disable=import-outside-toplevel

        t = t.detach().cpu()
        if t.dtype == torch.bfloat16:
            import ml_dtypes  # pylint: disable=import-outside-toplevel

            return t.float().numpy().astype(ml_dtypes.bfloat16)
        return t.numpy()
    return np.asarray(t)


def _shape_of(tensors: Mapping[str, Any], name: str) -> tuple[int, ...]:
    """A tensor's shape without reading it when `tensors` can tell (a lazy safetensors mapping)."""
    return tuple(tensors.shape(name)) if hasattr(tensors, "shape") else tuple(np.shape(tensors[name]))


def leaf_sources(tensors: Mapping[str, Any], abstract: Tree, *, qformer_group: int = 2,
                 source: str = "checkpoint") -> dict[str, list[tuple[str, Slot]]]:
    """Our '/'-joined path -> [(the Hugging Face tensor to read, its slot)] for every leaf of our
    tree (shapes of `abstract`), nothing read but headers.

    Strict: every tensor is used exactly once (tied aliases must equal what they alias); every
    parameter is found; every shape matches. All problems are collected and raised together in
    one `CheckpointMismatchError`, so a caller never starts on a checkpoint it cannot finish.
    """
    shapes = flat_shapes(abstract)
    table = slots(shapes, qformer_group=qformer_group)
    keys = set(tensors)
    aliases = {a: c for a, c in _lm_prefixed(_ALIASES, set(table)).items() if a not in table}  # untied: own slot
    fallbacks = _lm_prefixed(_FALLBACKS, keys)

    def source_for(name: str) -> str:
        return name if name in keys else fallbacks[name]

    missing, shape_errors, alias_errors = [], [], []
    for name, slot in table.items():
        if name not in keys and name not in fallbacks:
            missing.append(f"{name} (for {slot.path}{'' if slot.index is None else f'[{slot.index}]'})")
            continue
        want = hf_shape(slot, shapes[slot.path])
        got = _shape_of(tensors, source_for(name))
        if got != want:
            shape_errors.append(f"{source_for(name)}: shape {got}, expected {want} (for {slot.path})")
    unknown = sorted(keys - set(table) - set(aliases))
    for alias, canon in aliases.items():
        if alias in keys and canon in keys:
            if _shape_of(tensors, alias) != _shape_of(tensors, canon) or not np.array_equal(
                    to_numpy(tensors[alias]), to_numpy(tensors[canon])):
                alias_errors.append(f"{alias}: must equal the tied tensor {canon} but differs")
    problems = []
    for title, items in (("missing", missing), ("unexpected", unknown), ("wrong shape", shape_errors),
                         ("tied tensors that differ", alias_errors)):
        if items:
            problems.append(f"  {title} ({len(items)}):\n" + "\n".join(f"    {x}" for x in sorted(items)))
    if problems:
        raise CheckpointMismatchError(f"{source} does not match the model:\n" + "\n".join(problems))

    by_leaf: dict[str, list[tuple[str, Slot]]] = {}
    for name, slot in table.items():
        by_leaf.setdefault(slot.path, []).append((source_for(name), slot))
    return by_leaf


def iter_from_hf(tensors: Mapping[str, Any], abstract: Tree, *, qformer_group: int = 2,
                 dtype: Any = None, source: str = "checkpoint") -> Iterator[tuple[str, np.ndarray]]:
    """('/'-joined path, array) for every leaf of our tree (shapes of `abstract`), one leaf at a
    time, from Hugging Face `tensors` (read lazily: one stacked leaf is in memory at a time), after
    `leaf_sources`' checks. `dtype` (default: the abstract leaf dtype) is the storage dtype."""
    shapes = flat_shapes(abstract)
    dtypes = {"/".join(k): v.dtype for k, v in traverse_util.flatten_dict(abstract).items()}
    for path, entries in leaf_sources(tensors, abstract, qformer_group=qformer_group, source=source).items():
        target = dtype if dtype is not None else dtypes[path]
        if entries[0][1].index is None:
            (name, slot), = entries
            value = np.array(slot.to_flax(to_numpy(tensors[name])), target, order="C")  # a copy, never a view of
            yield path, finite(name, value, source)  # torch's memory or of the file
            continue
        out = np.empty(shapes[path], target)  # filled layer by layer: no list of copies to stack
        for name, slot in entries:
            out[slot.index] = finite(name, slot.to_flax(to_numpy(tensors[name])), source)
        yield path, out


def from_hf(tensors: Mapping[str, Any], abstract: Tree, *, qformer_group: int = 2,
            dtype: Any = None, source: str = "checkpoint") -> Tree:
    """Our parameter tree filled from Hugging Face `tensors` (strict; see `iter_from_hf`)."""
    flat = dict(iter_from_hf(tensors, abstract, qformer_group=qformer_group, dtype=dtype, source=source))
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def to_hf(params: Tree, *, qformer_group: int = 2) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, tensor) for every parameter of `params`, one tensor at a time."""
    flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()}
    for name, slot in slots({k: np.shape(v) for k, v in flat.items()}, qformer_group=qformer_group).items():
        value = np.asarray(flat[slot.path])
        yield name, slot.to_hf(value if slot.index is None else value[slot.index])
