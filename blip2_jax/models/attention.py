"""The one attention function every tower uses, and the boolean mask builders.

Masks are boolean (True = may attend) and broadcast to (batch, heads, query, key). On GPU and TPU,
attention without dropout goes through `jax.nn.dot_product_attention` (cuDNN flash where the
device allows). On CPU, and wherever attention-probability dropout needs the probabilities (the
Q-Former trains with 0.1), it is computed here with the heads moved ahead of the tokens first:
XLA:CPU runs the two batched matmuls about twice as fast in that layout as in the token-major
one `jax.nn`'s XLA path uses (ViT-B's attention, 8 images: 28 -> 15 ms on 2 Xeon cores).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    deterministic: bool = True,
    implementation: str | None = None,
) -> jax.Array:
    """Multi-head attention. query (B,T,N,H), key/value (B,S,K,H) -> (B,T,N,H), where K divides N:
    with K < N (grouped-query attention, as LLaMA-family models use) query head n reads K/V head
    n // (N / K), as in `jax.nn.dot_product_attention`, without copying K/V per query head.

    `scale` defaults to H**-0.5 (T5 passes 1.0). `bias` (T5 relative positions) is added to the
    logits before masking. Softmax runs in float32.
    """
    if mask is not None:
        mask = _as_4d(mask)
    if bias is not None:
        bias = _as_4d(bias)
    dropout = not deterministic and dropout_rate > 0.0
    if not dropout and (implementation is not None or jax.default_backend() != "cpu"):
        return jax.nn.dot_product_attention(query, key, value, bias=bias, mask=mask, scale=scale,
                                            implementation=implementation)
    if dropout and dropout_rng is None:
        raise ValueError("attention dropout is active but no dropout_rng was given")
    b, t, heads, dim = query.shape
    groups = heads // key.shape[-2]  # query heads per K/V head (grouped-query attention), as jax.nn's
    scale = dim ** -0.5 if scale is None else scale
    q = jnp.moveaxis(query, 1, 2).reshape(b, heads // groups, groups, t, dim)  # (B,K,G,T,H)
    k, v = jnp.moveaxis(key, 1, 2), jnp.moveaxis(value, 1, 2)  # (B,K,S,H)
    logits = jnp.einsum("bkgth,bksh->bkgts", q, k, preferred_element_type=jnp.float32).reshape(b, heads, t, -1)
    logits = logits * scale
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    if dropout:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    probs = probs.astype(value.dtype).reshape(b, heads // groups, groups, t, -1)
    return jnp.moveaxis(jnp.einsum("bkgts,bksh->bkgth", probs, v).reshape(b, heads, t, dim), 1, 2)


def prefixed_attention(query: jax.Array, key: jax.Array, value: jax.Array, prefix_key: jax.Array,
                       prefix_value: jax.Array, *, mask: jax.Array | None, prefix_mask: jax.Array) -> jax.Array:
    """Attention over [a prefix shared by groups of rows ; each row's own keys], without copying the
    prefix per row: the prompt of a beam search is stored once per sample, not once per beam.

    query (N,T,n,H) with N = B*G (G consecutive rows per prefix); key/value (N,K,S,H) and
    prefix_key/value (B,K,P,H) in the cache layout, K dividing n (grouped-query heads, as
    `dot_product_attention`); prefix_mask (B,P) key validity, `mask` over the own keys
    (broadcastable to (N,n,T,S)). Equals `dot_product_attention` over the concatenated keys.
    """
    n, t, heads, dim = query.shape
    b, kv, p = prefix_key.shape[:3]
    g, groups = n // b, heads // kv
    scale = dim ** -0.5
    q = query.reshape(n, t, kv, groups, dim)
    own = jnp.einsum("btkqh,bksh->bkqts", q, key, preferred_element_type=jnp.float32).reshape(n, heads, t, -1)
    shared = jnp.einsum("bgtkqh,bkph->bgkqtp", q.reshape(b, g, t, kv, groups, dim), prefix_key,
                        preferred_element_type=jnp.float32)
    shared = jnp.where(prefix_mask.astype(bool)[:, None, None, None, None, :], shared * scale,
                       jnp.finfo(jnp.float32).min)
    own = own * scale
    if mask is not None:
        own = jnp.where(_as_4d(mask), own, jnp.finfo(jnp.float32).min)
    logits = jnp.concatenate([shared.reshape(n, heads, t, p), own], axis=-1)
    probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
    out = jnp.einsum("bgkqtp,bkph->bgtkqh", probs[..., :p].reshape(b, g, kv, groups, t, p), prefix_value)
    own_out = jnp.einsum("bkqts,bksh->btkqh", probs[..., p:].reshape(n, kv, groups, t, -1), value)
    return (out.reshape(n, t, kv, groups, dim) + own_out).reshape(n, t, heads, dim)


# Every K/V cache leaf ends in (rows, heads, slots, head_dim), the layout a decoding step's attention
# contracts without transposing the cache (XLA:CPU would copy it per layer and step otherwise):
# stacked over layers (L, B, N, S, H) for a scanned stack, one (B, N, S, H) array per layer for an
# unrolled one (`layers.stack_layers`). Beams are reordered along the rows axis.
CACHE_ROWS_AXIS = -4


def cache_shape(cache: Any) -> tuple[int, int]:
    """(rows, slots) of a K/V cache in either layout."""
    leaf = jax.tree.leaves(cache)[0]
    return leaf.shape[CACHE_ROWS_AXIS], leaf.shape[-2]


def write_cache(buffer: jax.Array, new: jax.Array, index: jax.Array | int) -> jax.Array:
    """A layer's K or V buffer (B,N,S,H) with the new tokens' `new` (B,T,N,H) written at slot `index`."""
    return jax.lax.dynamic_update_slice(buffer, jnp.swapaxes(new, 1, 2).astype(buffer.dtype), (0, 0, index, 0))


def token_major(buffer: jax.Array) -> jax.Array:
    """A cache buffer (B,N,S,H) as the (B,S,N,H) keys or values `dot_product_attention` takes (on CPU
    the two transposes cancel: it moves the heads forward again)."""
    return jnp.swapaxes(buffer, 1, 2)


def _as_4d(x: jax.Array) -> jax.Array:
    if x.ndim > 4:
        raise ValueError(f"attention mask/bias must have at most 4 dims (B,N,T,S), got shape {x.shape}")
    return x.reshape((1,) * (4 - x.ndim) + x.shape)


def padding_mask(key_mask: jax.Array) -> jax.Array:
    """(B,S) 1/0 or bool key validity -> (B,1,1,S) boolean mask."""
    return key_mask.astype(bool)[:, None, None, :]


def causal_mask(query_length: int, key_length: int | None = None, offset: int | jax.Array = 0) -> jax.Array:
    """(1,1,T,S) lower-triangular mask: query t (at absolute position offset+t) sees keys <= it."""
    key_length = query_length if key_length is None else key_length
    q_pos = jnp.arange(query_length)[:, None] + offset
    k_pos = jnp.arange(key_length)[None, :]
    return (k_pos <= q_pos)[None, None]


def combine_masks(*masks: jax.Array | None) -> jax.Array | None:
    """Logical AND of the given masks (None entries ignored), broadcast to 4 dims."""
    present = [_as_4d(m.astype(bool)) for m in masks if m is not None]
    if not present:
        return None
    out = present[0]
    for m in present[1:]:
        out = jnp.logical_and(out, m)
    return out


QFORMER_MASKS = ("unimodal", "bidirectional", "multimodal_causal")


def qformer_mask(kind: str, query_length: int, text_mask: jax.Array) -> jax.Array:
    """The Q-Former self-attention mask over [queries ; text] (spec §5.4), (B,1,Q+L,Q+L) bool.

    unimodal (ITC): queries see queries, text sees (unpadded) text.
    bidirectional (ITM): everyone sees the queries and the unpadded text.
    multimodal_causal (ITG): queries see queries; text sees the queries and earlier unpadded text.
    text_mask: (B,L) 1 for real tokens.
    """
    if kind not in QFORMER_MASKS:
        raise ValueError(f"unknown Q-Former mask {kind!r}; expected one of {QFORMER_MASKS}")
    b, length = text_mask.shape
    q = query_length
    text_keys = text_mask.astype(bool)[:, None, :]  # (B,1,L)
    ones_qq = jnp.ones((b, q, q), bool)
    if kind == "bidirectional":
        keys = jnp.concatenate([jnp.ones((b, 1, q), bool), text_keys], axis=-1)
        return jnp.broadcast_to(keys, (b, q + length, q + length))[:, None]
    text_text = jnp.broadcast_to(text_keys, (b, length, length))
    if kind == "multimodal_causal":
        text_text = jnp.logical_and(text_text, jnp.tri(length, dtype=bool)[None])
    text_query = jnp.full((b, length, q), kind == "multimodal_causal")
    top = jnp.concatenate([ones_qq, jnp.zeros((b, q, length), bool)], axis=-1)
    bottom = jnp.concatenate([text_query, text_text], axis=-1)
    return jnp.concatenate([top, bottom], axis=1)[:, None]


def position_ids_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Decoder-only positions counting real tokens only: cumsum(mask) * mask - 1, padding -1 (a
    left-padded row gets the positions it has alone; padding attends to nothing that matters)."""
    mask = attention_mask.astype(jnp.int32)
    return jnp.cumsum(mask, axis=1) * mask - 1


def decoder_mask(query_length: int, attention_mask: jax.Array, position_ids: jax.Array | None, cache: Any,
                 cache_index: jax.Array | int | None) -> tuple[jax.Array, jax.Array]:
    """(mask, position_ids) of a decoder-only LM call (OPT, LLaMA). Without a cache: causal over the
    T inputs and their (B,T) padding, positions from the mask unless given. With one: causal from
    `cache_index` over the whole (B,S) buffer mask; the caller gives the positions."""
    if cache is None:
        mask = combine_masks(causal_mask(query_length), padding_mask(attention_mask))
        return mask, position_ids_from_mask(attention_mask) if position_ids is None else position_ids
    if position_ids is None or cache_index is None:
        raise ValueError("decoding with a cache needs position_ids and cache_index")
    slots = cache_shape(cache)[1]
    return combine_masks(causal_mask(query_length, slots, offset=cache_index), padding_mask(attention_mask)), \
        position_ids
