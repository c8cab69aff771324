"""Bicubic resizing of positional-embedding grids, matching PyTorch's `interpolate`.

Checkpoints trained at one resolution are run at another (e.g. 224 px weights in 364 px models),
so the patch grid of the positional embedding must be resized (spec §2.1/§2.3). EVA ViT (HF
`Blip2VisionEmbeddings.interpolate_pos_encoding`) uses align_corners=False, LAVIS's CLIP ViT-L
align_corners=True. Resizing is separable: per-axis (out, in) weight matrices are built in numpy
at trace time (shapes are static) and applied with one float32 einsum, so it jits and differentiates.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

_A = -0.75  # cubic convolution coefficient used by PyTorch


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys cubic convolution kernel with coefficient `_A`."""
    x = np.abs(x)
    near = ((_A + 2) * x - (_A + 3)) * x * x + 1
    far = ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def _bicubic_matrix(in_size: int, out_size: int, align_corners: bool) -> np.ndarray:
    """(out_size, in_size) matrix of 1-D bicubic weights, border indices replicated."""
    dst = np.arange(out_size, dtype=np.float64)
    if align_corners:
        scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
        src = dst * scale
    else:
        src = (dst + 0.5) * (in_size / out_size) - 0.5
    base = np.floor(src)
    t = src - base
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.arange(out_size)
    for offset in (-1, 0, 1, 2):
        idx = np.clip(base.astype(np.int64) + offset, 0, in_size - 1)
        np.add.at(matrix, (rows, idx), _cubic(t - offset))
    return matrix.astype(np.float32)


def resize_bicubic(x: jax.Array, size: tuple[int, int], *, align_corners: bool) -> jax.Array:
    """Resize (H, W, C) to (size[0], size[1], C) like torch bicubic `interpolate` (no antialias)."""
    height, width, _ = x.shape
    rows = jnp.asarray(_bicubic_matrix(height, size[0], align_corners))
    cols = jnp.asarray(_bicubic_matrix(width, size[1], align_corners))
    return jnp.einsum(
        "ih,jw,hwc->ijc", rows, cols, x.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )


def interpolate_position_embedding(
    pos: jax.Array, grid: tuple[int, int], *, align_corners: bool
) -> jax.Array:
    """Resize the square patch grid of `pos` (1, 1 + g*g, D) to `grid`; the CLS row is kept."""
    num_patches, dim = pos.shape[1] - 1, pos.shape[2]
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"position embedding {pos.shape} has a non-square patch count {num_patches}")
    if tuple(grid) == (side, side):
        return pos
    patches = pos[0, 1:].reshape(side, side, dim)
    resized = resize_bicubic(patches, tuple(grid), align_corners=align_corners)
    resized = resized.reshape(1, grid[0] * grid[1], dim).astype(pos.dtype)
    return jnp.concatenate([pos[:, :1], resized], axis=1)
