"""Decoding loops over any LM step function: greedy/sampling and beam search.

Each is one `lax.while_loop` with static shapes (max_new_tokens slots), stopping as soon as every
sequence is done. The model is reached through `step(tokens (N,), cache, i) -> (logits (N,V), cache)`,
which feeds the i-th generated token; every cache leaf ends in (N, heads, S, head_dim) (stacked over
layers or one per layer, `attention.CACHE_ROWS_AXIS`), so beams are reordered by one gather per leaf.

Beam search follows `transformers`' vectorised `_beam_search` step for step (top 2K candidates,
finished hypotheses admitted only from the top K, its early-stop heuristic, -1e9 masking), so the
same model gives the same ids. The `lavis` modes follow the 4.x `BeamSearchScorer` LAVIS ran
instead (config.py's docstring): lengths and scores count a prefix of `counted` tokens per row,
the early stop looks at the best of all 2K candidates, and at max length every running beam is
finalised.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from blip2_jax.generation import logits as lp
from blip2_jax.generation.config import GenerationConfig
from blip2_jax.models.attention import CACHE_ROWS_AXIS

StepFn = Callable[[jax.Array, Any, jax.Array], tuple[jax.Array, Any]]
MASKED = -1.0e9  # transformers' "very negative" beam score


@struct.dataclass
class SearchOutput:
    tokens: jax.Array  # (B, R, max_new_tokens) int32: generated ids, then pad
    lengths: jax.Array  # (B, R) generated tokens, EOS included
    scores: jax.Array  # (B, R) beam: sum log p / length ** length_penalty; else sum log p of the raw logits


def _process(scores: jax.Array, history: jax.Array, i: jax.Array, counted: jax.Array, cfg: GenerationConfig,
             eos: int) -> jax.Array:
    """The processors `transformers` applies before choosing a token (repetition, minimum length):
    `counted` (N,) tokens before the generated ones count in LAVIS's min_length."""
    if cfg.repetition_penalty != 1.0:
        scores = lp.repetition_penalty(scores, history, cfg.repetition_penalty)
    if cfg.min_new_tokens > 0:
        scores = lp.forbid_eos(scores, eos, i < cfg.min_new_tokens)
    if cfg.min_length > 0:
        scores = lp.forbid_eos(scores, eos, counted + i < cfg.min_length)
    return scores


def _finish(tokens: jax.Array, lengths: jax.Array, pad: int) -> jax.Array:
    """Unwritten slots (-1) and everything after each sequence's end become `pad`."""
    valid = jnp.arange(tokens.shape[-1]) < lengths[..., None]
    return jnp.where(valid & (tokens >= 0), tokens, pad).astype(jnp.int32)


def _reorder(cache: Any, rows: jax.Array) -> Any:
    return jax.tree.map(lambda x: jnp.take(x, rows, axis=CACHE_ROWS_AXIS), cache)


def row_keys(rng: jax.Array | None, copies: int) -> jax.Array | None:
    """One key (unchanged) or a key per sample (B, 2) -> a key per row (B * copies, 2): copy r of
    sample b draws with `fold_in(rng[b], r)`, so a sample's texts do not depend on its batch."""
    if rng is None or rng.ndim == 1:
        return rng
    per_copy = jax.vmap(lambda key: jax.vmap(functools.partial(jax.random.fold_in, key))(jnp.arange(copies)))
    return per_copy(rng).reshape(-1, rng.shape[-1])


def _draw(rng: jax.Array, scores: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(the next rng, a token per row drawn from softmax(scores)) with one key or a key per row."""
    if rng.ndim == 1:
        rng, key = jax.random.split(rng)
        return rng, jax.random.categorical(key, scores, axis=-1)
    keys = jax.vmap(jax.random.split)(rng)
    return keys[:, 0], jax.vmap(jax.random.categorical)(keys[:, 1], scores)


def sample_search(step: StepFn, logits: jax.Array, cache: Any, history: jax.Array, counted: jax.Array,
                  cfg: GenerationConfig, *, eos: int, pad: int, rng: jax.Array | None = None) -> SearchOutput:
    """Greedy (argmax) or, with `cfg.do_sample`, temperature/top-k/top-p sampling, for N rows.

    `logits` (N,V) predict the first new token; `history` (N,P) are the ids the repetition penalty
    sees before the generated ids (negative: none); `counted` (N,) the tokens before the generated
    ones that `cfg.min_length` counts. `rng` is one key for the batch or one per row (N, 2): a row
    with its own key draws the same tokens in any batch, on any mesh. Returns (N, 1, L) tokens.
    """
    n, steps = logits.shape[0], cfg.max_new_tokens
    if cfg.do_sample and rng is None:
        raise ValueError("sampling needs an rng")
    rng = jax.random.PRNGKey(0) if rng is None else rng

    def body(carry):
        i, tokens, done, logits, cache, rng, logp = carry
        scores = _process(logits, jnp.concatenate([history, tokens], axis=1), i, counted, cfg, eos)
        if cfg.do_sample:
            rng, token = _draw(rng, lp.top_p(lp.top_k(scores / cfg.temperature, cfg.top_k), cfg.top_p))
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


def _powers(top: int, exponent: float) -> jax.Array:
    """n ** exponent for n = 0..top (0 ** x taken as 1: never used as a divisor), in float64 then
    float32 as torch computes its length penalty."""
    return jnp.asarray(np.maximum(np.arange(top + 1, dtype=np.float64), 1.0) ** exponent, jnp.float32)


def _keep_best(fin: tuple[jax.Array, jax.Array, jax.Array], new: tuple[jax.Array, jax.Array, jax.Array],
               k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The best k of the finished (seqs, scores, is_finished) and the new candidates; on equal
    scores the finished ones stay (a hypothesis replaces one only when strictly better)."""
    scores = jnp.concatenate([fin[1], new[1]], axis=1)
    _, best = jax.lax.top_k(scores, k)
    return (jnp.take_along_axis(jnp.concatenate([fin[0], new[0]], axis=1), best[:, :, None], axis=1),
            jnp.take_along_axis(scores, best, axis=1),
            jnp.take_along_axis(jnp.concatenate([fin[2], new[2]], axis=1), best, axis=1))


def beam_search(step: StepFn, logits: jax.Array, cache: Any, history: jax.Array, counted: jax.Array,
                cfg: GenerationConfig, *, eos: int, pad: int) -> SearchOutput:
    """Beam search over N = B*K rows (each batch row's K beams adjacent, all starting from the same
    prompt, as `logits`, `cache`, `history` and `counted` are expanded by the caller). Returns the
    best `num_return_sequences` finished hypotheses per batch row, best first: (B, R, L)."""
    k, steps = cfg.num_beams, cfg.max_new_tokens
    n, vocab = logits.shape
    b = n // k
    keep = 2 * k  # transformers: max(2, 1 + number of EOS ids) * num_beams
    v4 = cfg.semantics != "transformers"  # LAVIS's transformers 4.x BeamSearchScorer
    prefix = counted.reshape(b, k)[:, :1] if v4 else jnp.zeros((b, 1), jnp.int32)
    # Denominators length ** length_penalty, indexed by length: new tokens (+ the counted prefix).
    denominators = _powers(history.shape[1] + steps + 1, cfg.length_penalty)
    # 4.33 judges the early stop at the length after this step, 4.26 at the length before it.
    heuristic_offset = 1 if cfg.semantics == "lavis" else 0
    optimistic = cfg.early_stopping == "never" and cfg.length_penalty > 0.0
    stop_when_full = cfg.early_stopping is True

    def body(carry):
        i, run_seqs, run_scores, fin_seqs, fin_scores, is_fin, open_rows, logits, cache, _ = carry
        seen = jnp.concatenate([history, run_seqs.reshape(n, steps)], axis=1)
        logp = _process(jax.nn.log_softmax(logits, axis=-1), seen, i, counted, cfg, eos)
        total = (logp.reshape(b, k, vocab) + run_scores[:, :, None]).reshape(b, k * vocab)
        top_scores, top_index = jax.lax.top_k(total, keep)
        parent, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
        cand = jnp.take_along_axis(run_seqs, parent[:, :, None], axis=1)
        cand = jax.lax.dynamic_update_slice(cand, token[:, :, None], (0, 0, i))
        last = i + 1 >= steps
        hits = token == eos
        if not v4:  # 4.x stops at max length outside its scorer (running beams are finalised below)
            hits = hits | last

        # The best K candidates that did not stop keep running.
        run_candidates = top_scores + hits.astype(jnp.float32) * MASKED
        _, nxt = jax.lax.top_k(run_candidates, k)
        run_seqs = jnp.take_along_axis(cand, nxt[:, :, None], axis=1)
        run_scores = jnp.take_along_axis(run_candidates, nxt, axis=1)
        parent = jnp.take_along_axis(parent, nxt, axis=1)

        # Candidates among the top K that stopped compete with the finished set; an EOS-ended one
        # is as long as the prefix and the tokens before its EOS (4.x) or its new tokens with EOS.
        just_finished = hits & (jnp.arange(keep) < k)[None, :]
        scores = top_scores / denominators[prefix + i + (0 if v4 else 1)]
        full = jnp.all(is_fin, axis=1, keepdims=True) & stop_when_full
        scores = scores + full.astype(jnp.float32) * MASKED
        scores = scores + (~open_rows).astype(jnp.float32) * MASKED
        scores = scores + (~just_finished).astype(jnp.float32) * MASKED
        fin_seqs, fin_scores, is_fin = _keep_best((fin_seqs, fin_scores, is_fin), (cand, scores, just_finished), k)

        # The early-stop heuristic: can the best candidate still beat the worst finished one?
        worst = jnp.where(is_fin, jnp.min(fin_scores, axis=1, keepdims=True), MASKED)
        if v4:
            length = prefix + steps if optimistic else prefix + i + heuristic_offset
            attainable = top_scores[:, :1] / denominators[length]
            done = jnp.all(is_fin, axis=1, keepdims=True) & (stop_when_full | (worst[:, :1] >= attainable))
            open_rows = open_rows & ~done
            # At max length 4.x's finalize adds every running beam of the rows not done.
            final = (run_scores / denominators[prefix + steps]) + (~(open_rows & last)).astype(jnp.float32) * MASKED
            fin_seqs, fin_scores, is_fin = _keep_best((fin_seqs, fin_scores, is_fin),
                                                      (run_seqs, final, jnp.broadcast_to(open_rows & last, (b, k))), k)
            go_on = jnp.any(open_rows) & ~last
        else:
            best_length = steps - 1 if optimistic else i
            best_running = run_scores[:, :1] / denominators[best_length + 1]
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
