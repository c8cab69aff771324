"""Logit processors, each the pure-array form of its `transformers` namesake.

Scores are (N, V) float32. Token histories are (N, T) int32 where a negative id marks a slot not
yet written (it is ignored).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def repetition_penalty(scores: jax.Array, history: jax.Array, penalty: float) -> jax.Array:
    """Every id in `history` (the prompt ids, padding and image tokens included, and the generated
    ids, as `transformers` passes its `input_ids`) has its score multiplied by `penalty` when
    negative and divided by it otherwise."""
    vocab = scores.shape[-1]
    ids = jnp.where(history < 0, vocab, history)  # out of range: dropped by the scatter
    picked = jnp.take_along_axis(scores, jnp.minimum(ids, vocab - 1), axis=-1)
    penalised = jnp.where(picked < 0, picked * penalty, picked / penalty)
    rows = jnp.arange(scores.shape[0])[:, None]
    return scores.at[rows, ids].set(penalised, mode="drop")


def forbid_eos(scores: jax.Array, eos_token_id: int, forbid: jax.Array | bool) -> jax.Array:
    """EOS gets -inf where `forbid` (the minimum length not reached yet; one flag, or one per row)."""
    return scores.at[:, eos_token_id].set(jnp.where(forbid, NEG_INF, scores[:, eos_token_id]))


def top_k(scores: jax.Array, k: int) -> jax.Array:
    """Keep the scores >= the k-th largest (ties at the boundary stay, as in transformers)."""
    if k <= 0 or k >= scores.shape[-1]:
        return scores
    kth = jax.lax.top_k(scores, k)[0][:, -1:]
    return jnp.where(scores < kth, NEG_INF, scores)


def top_p(scores: jax.Array, p: float) -> jax.Array:
    """Nucleus: keep the most probable tokens whose probabilities before them sum to < p (at least one)."""
    if p >= 1.0:
        return scores
    order = jnp.argsort(-scores, axis=-1)
    sorted_scores = jnp.take_along_axis(scores, order, axis=-1)
    probs = jax.nn.softmax(sorted_scores, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = (before < p).at[:, 0].set(True)
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(scores.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep, scores, NEG_INF)
