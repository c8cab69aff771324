"""Captions from a stage-1 model's own decoder: the Q-Former's image-grounded text generation (ITG)
head, as LAVIS's `Blip2Qformer.generate` decodes it (BLIP's captioner, which CapFilt samples from).

The text starts with `[DEC]` (bos), ends with `[SEP]` (eos) and pads with `[PAD]`; it attends
causally to itself and to the queries' self-attention keys/values over the image, computed once per
image (`query_pass`). Each step runs the Q-Former over the whole text so far (no text cache: the
Q-Former is small next to an LLM and a caption short), so the logits at every position are exactly
`itg_logits` on the finished text, the function training's ITG loss reads.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from blip2_jax.generation.config import GenerationConfig
from blip2_jax.generation.search import SearchOutput, beam_search, row_keys, sample_search
from blip2_jax.models.blip2 import Blip2Stage1


def generate_captions(params: Any, pixel_values: jax.Array, rng: jax.Array | None = None, *, model: Blip2Stage1,
                      config: GenerationConfig, bos: int, eos: int, pad: int) -> SearchOutput:
    """Captions for a batch of images (B, H, W, 3), preprocessed: tokens (B, R, L), new ids only.
    Sampling takes `rng`, one key or one per image (B, 2) as `decode.generate` does. The repetition
    penalty sees `[DEC]` and the generated ids; LAVIS's min_len counts `[DEC]` (its generate is
    given it as input_ids), the transformers mode counts new tokens only."""
    variables = {"params": params}
    image_embeds = model.apply(variables, pixel_values, method="encode_image")
    _, query_kv = model.apply(variables, image_embeds, method="query_pass")
    copies = config.num_beams if config.num_beams > 1 else config.num_return_sequences
    b, width = pixel_values.shape[0], config.max_new_tokens + 1
    n = b * copies
    query_kv = jax.tree.map(lambda x: jnp.repeat(x, copies, axis=1), query_kv)  # (layers, N, Q, heads, dim)
    # The text so far, one row per beam or sample: (N, width, 1, 1) so that its rows are on the axis
    # the search loops reorder cache leaves along (`attention.CACHE_ROWS_AXIS`).
    text = jnp.full((n, width, 1, 1), pad, jnp.int32).at[:, 0].set(bos)

    def logits_at(ids: jax.Array, position: jax.Array) -> jax.Array:
        all_logits = model.apply(variables, ids[:, :, 0, 0], jnp.ones((n, width), jnp.int32), query_kv,
                                 method="itg_logits")
        return jax.lax.dynamic_index_in_dim(all_logits, position, axis=1, keepdims=False).astype(jnp.float32)

    def step(token, ids, i):
        ids = jax.lax.dynamic_update_slice(ids, token[:, None, None, None], (0, i + 1, 0, 0))
        return logits_at(ids, i + 1), ids

    history = jnp.full((n, 1), bos, jnp.int32)
    counted = jnp.full((n,), 0 if config.semantics == "transformers" else 1, jnp.int32)
    logits = logits_at(text, jnp.int32(0))
    if config.num_beams > 1:
        return beam_search(step, logits, text, history, counted, config, eos=eos, pad=pad)
    rng = row_keys(rng, copies)
    out = sample_search(step, logits, text, history, counted, config, eos=eos, pad=pad, rng=rng)
    return jax.tree.map(lambda x: x.reshape(b, config.num_return_sequences, *x.shape[2:]), out)
