"""Decoding loops over any LM step function: greedy/sampling and beam search.

Each is one `lax.while_loop` with static shapes (max_new_tokens slots), stopping as soon as every
sequence is done. The model is reached through `step(tokens (N,), cache, i) -> (logits (N,V), cache)`,
which feeds the i-th generated token; every cache leaf has the batch on axis 1 (the layer stacks'
(layers, N, S, heads, head_dim)), so beams are reordered by one gather per leaf.

Beam search follows `transformers`' vectorised `_beam_search` step for step (top 2K candidates,
finished hypotheses admitted only from the top K, its early-stop heuristic, -1e9 masking), so the
same model gives the same ids.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from blip2_jax.generation import logits as lp
from blip2_jax.generation.config import GenerationConfig

StepFn = Callable[[jax.Array, Any, jax.Array], tuple[jax.Array, Any]]
MASKED = -1.0e9  # transformers' "very negative" beam score


@struct.dataclass
class SearchOutput:
    tokens: jax.Array  # (B, R, max_new_tokens) int32: generated ids, then pad
    lengths: jax.Array  # (B, R) generated tokens, EOS included
    scores: jax.Array  # (B, R) beam: sum log p / length ** length_penalty; else sum log p of the raw logits


def _process(scores: jax.Array, history: jax.Array, i: jax.Array, cfg: GenerationConfig, eos: int) -> jax.Array:
    """The processors `transformers` applies before choosing a token (repetition, min new tokens)."""
    if cfg.repetition_penalty != 1.0:
        scores = lp.repetition_penalty(scores, history, cfg.repetition_penalty)
    if cfg.min_new_tokens > 0:
        scores = lp.forbid_eos(scores, eos, i < cfg.min_new_tokens)
    return scores


def _finish(tokens: jax.Array, lengths: jax.Array, pad: int) -> jax.Array:
    """Unwritten slots (-1) and everything after each sequence's end become `pad`."""
    valid = jnp.arange(tokens.shape[-1]) < lengths[..., None]
    return jnp.where(valid & (tokens >= 0), tokens, pad).astype(jnp.int32)


def _reorder(cache: Any, rows: jax.Array) -> Any:
    return jax.tree.map(lambda x: jnp.take(x, rows, axis=1), cache)


def sample_search(step: StepFn, logits: jax.Array, cache: Any, prompt_ids: jax.Array, cfg: GenerationConfig, *,
                  eos: int, pad: int, rng: jax.Array | None = None) -> SearchOutput:
    """Greedy (argmax) or, with `cfg.do_sample`, temperature/top-k/top-p sampling, for N rows.

    `logits` (N,V) predict the first new token; `prompt_ids` (N,P) are what the repetition penalty
    sees before the generated ids. Returns (N, 1, L) tokens.
    """
    n, steps = logits.shape[0], cfg.max_new_tokens
    if cfg.do_sample and rng is None:
        raise ValueError("sampling needs an rng")
    rng = jax.random.PRNGKey(0) if rng is None else rng

    def body(carry):
        i, tokens, done, logits, cache, rng, logp = carry
        scores = _process(logits, jnp.concatenate([prompt_ids, tokens], axis=1), i, cfg, eos)
        if cfg.do_sample:
            rng, key = jax.random.split(rng)
            warped = lp.top_p(lp.top_k(scores / cfg.temperature, cfg.top_k), cfg.top_p)
            token = jax.random.categorical(key, warped, axis=-1)
        else:
            token = jnp.argmax(scores, axis=-1)
        token = jnp.where(done, pad, token).astype(jnp.int32)
        chosen = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token[:, None], axis=-1)[:, 0]
        logp = logp + jnp.where(done, 0.0, chosen)
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, i))
        done = done | (token == eos)
        go_on = (i + 1 < steps) & ~jnp.all(done)
        logits, cache = jax.lax.cond(go_on, lambda: step(token, cache, i), lambda: (logits, cache))
        return i + 1, tokens, done, logits, cache, rng, logp

    def cond(carry):
        i, done = carry[0], carry[2]
        return (i < steps) & ~jnp.all(done)

    init = (jnp.int32(0), jnp.full((n, steps), -1, jnp.int32), jnp.zeros((n,), bool), logits, cache, rng,
            jnp.zeros((n,), jnp.float32))
    count, tokens, _, _, _, _, logp = jax.lax.while_loop(cond, body, init)
    is_eos = tokens == eos
    lengths = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1) + 1, count)
    return SearchOutput(tokens=_finish(tokens, lengths, pad)[:, None], lengths=lengths[:, None],
                        scores=logp[:, None])


def beam_search(step: StepFn, logits: jax.Array, cache: Any, prompt_ids: jax.Array, cfg: GenerationConfig, *,
                eos: int, pad: int) -> SearchOutput:
    """Beam search over N = B*K rows (each batch row's K beams adjacent, all starting from the same
    prompt, as `logits`, `cache` and `prompt_ids` are expanded by the caller). Returns the best
    `num_return_sequences` finished hypotheses per batch row, best first: (B, R, L)."""
    k, steps = cfg.num_beams, cfg.max_new_tokens
    n, vocab = logits.shape
    b = n // k
    keep = 2 * k  # transformers: max(2, 1 + number of EOS ids) * num_beams
    # Length-penalty denominators n ** length_penalty for n = 1..steps, in float64 then float32 as torch does.
    denominators = jnp.asarray(np.arange(1, steps + 1, dtype=np.float64) ** cfg.length_penalty, jnp.float32)
    optimistic = cfg.early_stopping == "never" and cfg.length_penalty > 0.0
    stop_when_full = cfg.early_stopping is True

    def body(carry):
        i, run_seqs, run_scores, fin_seqs, fin_scores, is_fin, open_rows, logits, cache, _ = carry
        history = jnp.concatenate([prompt_ids, run_seqs.reshape(n, steps)], axis=1)
        logp = _process(jax.nn.log_softmax(logits, axis=-1), history, i, cfg, eos)
        total = (logp.reshape(b, k, vocab) + run_scores[:, :, None]).reshape(b, k * vocab)
        top_scores, top_index = jax.lax.top_k(total, keep)
        parent, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
        cand = jnp.take_along_axis(run_seqs, parent[:, :, None], axis=1)
        cand = jax.lax.dynamic_update_slice(cand, token[:, :, None], (0, 0, i))
        hits = (token == eos) | (i + 1 >= steps)

        # The best K candidates that did not stop keep running.
        run_candidates = top_scores + hits.astype(jnp.float32) * MASKED
        _, nxt = jax.lax.top_k(run_candidates, k)
        run_seqs = jnp.take_along_axis(cand, nxt[:, :, None], axis=1)
        run_scores = jnp.take_along_axis(run_candidates, nxt, axis=1)
        parent = jnp.take_along_axis(parent, nxt, axis=1)

        # Candidates among the top K that stopped compete with the finished set.
        just_finished = hits & (jnp.arange(keep) < k)[None, :]
        scores = top_scores / denominators[i]
        full = jnp.all(is_fin, axis=1, keepdims=True) & stop_when_full
        scores = scores + full.astype(jnp.float32) * MASKED
        scores = scores + (~open_rows).astype(jnp.float32) * MASKED
        scores = scores + (~just_finished).astype(jnp.float32) * MASKED
        _, best = jax.lax.top_k(jnp.concatenate([fin_scores, scores], axis=1), k)
        fin_seqs = jnp.take_along_axis(jnp.concatenate([fin_seqs, cand], axis=1), best[:, :, None], axis=1)
        fin_scores = jnp.take_along_axis(jnp.concatenate([fin_scores, scores], axis=1), best, axis=1)
        is_fin = jnp.take_along_axis(jnp.concatenate([is_fin, just_finished], axis=1), best, axis=1)

        # transformers' heuristic: can the best running beam still beat the worst finished one?
        best_length = steps - 1 if optimistic else i
        best_running = run_scores[:, :1] / denominators[best_length]
        worst = jnp.where(is_fin, jnp.min(fin_scores, axis=1, keepdims=True), MASKED)
        open_rows = open_rows & jnp.any(best_running > worst, axis=1, keepdims=True)
        go_on = jnp.any(open_rows) & ~(jnp.all(is_fin) & stop_when_full) & ~jnp.all(hits)

        def advance():
            rows = (jnp.arange(b)[:, None] * k + parent).reshape(n)
            return step(run_seqs[:, :, i].reshape(n), _reorder(cache, rows), i)

        logits, cache = jax.lax.cond(go_on, advance, lambda: (logits, cache))
        return i + 1, run_seqs, run_scores, fin_seqs, fin_scores, is_fin, open_rows, logits, cache, go_on

    init_scores = jnp.zeros((b, k), jnp.float32).at[:, 1:].set(MASKED)
    empty = jnp.full((b, k, steps), -1, jnp.int32)
    init = (jnp.int32(0), empty, init_scores, empty, jnp.full((b, k), MASKED, jnp.float32),
            jnp.zeros((b, k), bool), jnp.ones((b, 1), bool), logits, cache, jnp.bool_(True))
    out = jax.lax.while_loop(lambda c: c[-1], body, init)
    r = cfg.num_return_sequences
    seqs, scores = out[3][:, :r], out[4][:, :r]
    lengths = jnp.sum(seqs >= 0, axis=-1)
    return SearchOutput(tokens=_finish(seqs, lengths, pad), lengths=lengths, scores=scores)
