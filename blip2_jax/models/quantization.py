"""int8 weight-only quantization of frozen dense layers, as a transform of the parameter tree.

A quantized layer stores its kernel W (d_in, d_out) as int8 Q with one float32 scale per output
channel, s_j = max_i |W_ij| / 127 and Q = round(W / s) (symmetric, absmax, per channel: the
LLM.int8() / AQT weight scheme without outlier columns). `layers.Dense` computes (x Q) * s in the
compute dtype: int8 -> bf16/fp32 is exact, so the only error is Q's rounding, at most s/2 per
weight. The kernel keeps its shape, logical axes and sharding, at a quarter of fp32's bytes (half
of bf16's), and `kernel_scale` is a small leaf beside it.

Layers are chosen by regexes over their path, as LoRA targets are (`models/lora.py`): `^language_model/`
quantizes the LLM. A quantized kernel cannot train; LoRA adapters on it can (QLoRA's arrangement).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from blip2_jax.models import dense_paths, lora

Tree = Any
SCALE = "kernel_scale"
TOWERS = ("^language_model/", "^vision_model/")  # every dense kernel of the frozen LLM and ViT


def quantize_kernel(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(int8 Q, float32 scale per output channel) of a kernel (..., d_in, d_out)."""
    w = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=-2) / 127.0
    q = jnp.round(w / jnp.where(scale == 0, 1.0, scale)[..., None, :])
    return jnp.clip(q, -127, 127).astype(jnp.int8), scale


def dequantize_kernel(q: Any, scale: Any) -> Any:
    return q.astype(np.float32) * np.asarray(scale, np.float32)[..., None, :]


def quantize(params: Tree, patterns: Sequence[str]) -> Tree:
    """`params` with the selected layers' kernels quantized. Works on boxed (`nn.Partitioned`)
    trees — the scale takes the kernel's output axis — and under `jax.eval_shape`."""
    if not patterns:
        return params
    flat = traverse_util.flatten_dict(params, sep="/")
    for layer in dense_paths.select(params, patterns, "int8"):
        kernel = flat[f"{layer}/kernel"]
        q, scale = quantize_kernel(dense_paths.value(kernel))
        if isinstance(kernel, nn.Partitioned):
            q, scale = kernel.replace_boxed(q), kernel.replace_boxed(scale).replace(
                names=(*kernel.names[:-2], kernel.names[-1]))
        flat[f"{layer}/kernel"], flat[f"{layer}/{SCALE}"] = q, scale
    return traverse_util.unflatten_dict(flat, sep="/")


def quantized_layers(paths: Sequence[str]) -> list[str]:
    """The quantized layers of a flat tree's '/'-joined leaf `paths`."""
    return sorted(p[: -len(SCALE) - 1] for p in paths if p.endswith("/" + SCALE))


def quantize_placed(params: Tree, patterns: Sequence[str], shardings: Tree) -> Tree:
    """Placed float `params` with the selected kernels quantized into `shardings` (a tree like the
    quantized parameters), one layer at a time: each float kernel is dropped once its int8 copy
    exists, so memory peaks at the float tree plus one int8 kernel."""
    flat = traverse_util.flatten_dict(params, sep="/")
    flat_sh = traverse_util.flatten_dict(shardings, sep="/")
    compiled: dict[Any, Any] = {}
    for layer in dense_paths.select(params, patterns, "int8"):
        path = f"{layer}/kernel"
        key = (flat_sh[path], flat_sh[f"{layer}/{SCALE}"])
        if key not in compiled:
            compiled[key] = jax.jit(quantize_kernel, out_shardings=key)
        flat[path], flat[f"{layer}/{SCALE}"] = compiled[key](flat[path])
    return traverse_util.unflatten_dict(flat, sep="/")


def keeps_dtype(path: str, dtype: Any) -> bool:
    """Whether a leaf stays in its own dtype when a run stores its weights in another: int8
    kernels, their float32 scales, and LoRA's constants (a dropout rate of 0.05 or a scaling of 16/6
    are not bfloat16 numbers)."""
    return np.dtype(dtype) == np.int8 or path.endswith("/" + SCALE) or lora.is_constant(path)
