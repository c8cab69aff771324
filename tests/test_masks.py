"""Attention masks and kernels: the three Q-Former self-attention masks (spec §5.4) as exact matrices on
a padded case, the shared-prefix attention of beam decoding against plain attention, and the attention
XLA:CPU and dropout run against a float64 reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blip2_jax.models.attention import causal_mask, dot_product_attention, prefixed_attention, qformer_mask

# Q = 2 queries; text of L = 4 with the last token padding.
TEXT_MASK = jnp.array([[1, 1, 1, 0]])
EXPECTED = {
    "unimodal": [  # queries <-> queries, text <-> real text, nothing across
        [1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 1, 1, 1, 0],
    ],
    "bidirectional": [  # every row sees the queries and the real text
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 0],
    ],
    "multimodal_causal": [  # queries see queries; text sees queries and earlier real text
        [1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 0],
    ],
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_mask_matrices(kind):
    got = qformer_mask(kind, 2, TEXT_MASK)
    assert got.shape == (1, 1, 6, 6) and got.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(got[0, 0]).astype(int), EXPECTED[kind])


def test_masks_are_per_example():
    masks = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0]])
    got = qformer_mask("multimodal_causal", 2, masks)
    np.testing.assert_array_equal(np.asarray(got[1, 0, 2:, 3:]).astype(int), np.zeros((4, 3), int))
    np.testing.assert_array_equal(np.asarray(got[0, 0]).astype(int), EXPECTED["multimodal_causal"])


def test_unknown_mask_kind():
    with pytest.raises(ValueError, match="bidirectional"):
        qformer_mask("causal", 2, TEXT_MASK)


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["multi_head", "grouped_query"])
def test_prefixed_attention_equals_attention_over_the_concatenated_keys(kv_heads):
    """Two samples x three rows each: the shared prefix (with padding) once per sample equals each
    row attending to its own copy of it followed by its own causally-masked keys. The own and the
    prefix K/V come in the cache layout (rows, K/V heads, slots, head_dim)."""
    rng = np.random.default_rng(0)
    b, g, t, p, s, n, h = 2, 3, 2, 5, 4, 4, 8
    q = rng.standard_normal((b * g, t, n, h)).astype(np.float32)
    k, v = (rng.standard_normal((b * g, s, kv_heads, h)).astype(np.float32) for _ in range(2))
    pk, pv = (rng.standard_normal((b, p, kv_heads, h)).astype(np.float32) for _ in range(2))
    prefix_mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    own_mask = np.asarray(causal_mask(t, s, offset=1))
    cache_layout = lambda x: jnp.asarray(x.transpose(0, 2, 1, 3))  # noqa: E731
    got = prefixed_attention(jnp.asarray(q), cache_layout(k), cache_layout(v), cache_layout(pk), cache_layout(pv),
                             mask=jnp.asarray(own_mask), prefix_mask=jnp.asarray(prefix_mask))
    full_k = np.concatenate([np.repeat(pk, g, 0), k], 1)
    full_v = np.concatenate([np.repeat(pv, g, 0), v], 1)
    full_mask = np.concatenate([np.broadcast_to(np.repeat(prefix_mask, g, 0)[:, None, None, :], (b * g, 1, t, p)),
                                np.broadcast_to(own_mask, (b * g, 1, t, s))], -1)
    expected = dot_product_attention(jnp.asarray(q), jnp.asarray(full_k), jnp.asarray(full_v),
                                     mask=jnp.asarray(full_mask, bool))
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-6)


def _reference_attention(q, k, v, mask, bias, scale, keep=None, rate=0.0):
    """Attention in float64 numpy, query head n reading K/V head n // (N / K) (grouped queries)."""
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2).astype(np.float64), np.repeat(v, groups, axis=2).astype(np.float64)
    logits = np.einsum("btnh,bsnh->bnts", q.astype(np.float64), k) * scale + bias
    logits = np.where(mask, logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if keep is not None:
        probs = np.where(keep, probs / (1.0 - rate), 0.0)
    return np.einsum("bnts,bsnh->btnh", probs, v)


@pytest.mark.parametrize("kv_heads", [6, 2], ids=["multi_head", "grouped_query"])
@pytest.mark.parametrize("dropout", [False, True], ids=["deterministic", "dropout"])
def test_attention_equals_a_float64_reference(kv_heads, dropout):
    """The heads-major attention XLA:CPU runs (and every dropout pass runs) computes attention:
    grouped-query heads, a T5-style bias with scale 1, padding and causal masks, and with dropout
    the probabilities zeroed where `bernoulli(rng, 1 - rate, (B,N,T,S))` is False and rescaled."""
    rng = np.random.default_rng(3)
    b, t, s, n, h = 2, 5, 7, 6, 8
    q = rng.standard_normal((b, t, n, h)).astype(np.float32)
    k, v = (rng.standard_normal((b, s, kv_heads, h)).astype(np.float32) for _ in range(2))
    bias = rng.standard_normal((1, n, t, s)).astype(np.float32)
    mask = np.asarray(causal_mask(t, s, offset=s - t)) & (np.arange(s) != 2)[None, None, None, :]
    key, rate = jax.random.PRNGKey(7), 0.25
    kw = dict(dropout_rate=rate, dropout_rng=key, deterministic=False) if dropout else {}
    got = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask=jnp.asarray(mask),
                                bias=jnp.asarray(bias), scale=1.0, **kw)
    keep = np.asarray(jax.random.bernoulli(key, 1.0 - rate, (b, n, t, s))) if dropout else None
    np.testing.assert_allclose(np.asarray(got), _reference_attention(q, k, v, mask, bias, 1.0, keep, rate),
                               rtol=0, atol=2e-6)
