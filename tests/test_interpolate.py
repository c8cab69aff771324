"""Bicubic resizing and positional-embedding interpolation against torch.nn.functional.interpolate."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from blip2_jax.models.interpolate import interpolate_position_embedding, resize_bicubic

CASES = [
    ((16, 16), (26, 26)),  # 224 px -> 364 px, patch 14
    ((16, 16), (7, 7)),
    ((5, 5), (7, 9)),
    ((2, 2), (3, 3)),
    ((4, 6), (1, 1)),
    ((4, 6), (1, 5)),
]


def _torch_resize(x: np.ndarray, size, align_corners: bool) -> np.ndarray:
    t = torch.from_numpy(x).permute(2, 0, 1)[None]
    out = F.interpolate(t, size=size, mode="bicubic", align_corners=align_corners)
    return out[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("in_hw,out_hw", CASES)
def test_resize_matches_torch(in_hw, out_hw, align_corners):
    x = np.random.default_rng(0).standard_normal((*in_hw, 3)).astype(np.float32)
    got = np.asarray(resize_bicubic(jnp.asarray(x), out_hw, align_corners=align_corners))
    want = _torch_resize(x, out_hw, align_corners)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("align_corners", [False, True])
def test_position_embedding_matches_torch(align_corners):
    g, d, grid = 16, 8, (26, 20)
    pos = np.random.default_rng(1).standard_normal((1, 1 + g * g, d)).astype(np.float32)
    got = interpolate_position_embedding(jnp.asarray(pos), grid, align_corners=align_corners)
    patches = _torch_resize(pos[0, 1:].reshape(g, g, d), grid, align_corners)
    want = np.concatenate([pos[:, :1], patches.reshape(1, -1, d)], axis=1)
    assert got.shape == (1, 1 + grid[0] * grid[1], d)
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5)


def test_position_embedding_identity_and_dtype():
    pos = jnp.ones((1, 1 + 9, 4), jnp.bfloat16)
    assert interpolate_position_embedding(pos, (3, 3), align_corners=False) is pos
    assert interpolate_position_embedding(pos, (5, 5), align_corners=False).dtype == jnp.bfloat16


def test_position_embedding_non_square_raises():
    with pytest.raises(ValueError, match=r"\(1, 11, 4\)"):
        interpolate_position_embedding(jnp.zeros((1, 11, 4)), (4, 4), align_corners=False)


def test_jit_and_grad():
    pos = jax.random.normal(jax.random.key(0), (1, 1 + 16, 4))
    value_and_grad = jax.jit(
        jax.value_and_grad(
            lambda p: interpolate_position_embedding(p, (6, 6), align_corners=True).sum()
        )
    )
    value, grad = value_and_grad(pos)
    want = interpolate_position_embedding(pos, (6, 6), align_corners=True).sum()
    np.testing.assert_allclose(value, want, rtol=0, atol=1e-5)
    assert grad.shape == pos.shape and bool(jnp.all(jnp.isfinite(grad)))
