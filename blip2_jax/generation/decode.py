"""BLIP-2 generation: image -> visual prompt -> prefilled LLM cache -> search.

The prompt is prefilled once per image and its cache repeated for the beams (or the returned
samples), so the vision tower, the Q-Former and the prompt run B times, not B*K. Decoder-only
(OPT) prompts are left-padded: positions follow the attention-mask cumsum (spec §13.14) and the
mask over the cache buffer is [prompt mask ; ones], as `transformers` extends it. Encoder-decoder
(T5) runs the encoder once and decodes from `decoder_start_token_id`.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from blip2_jax.generation.config import GenerationConfig
from blip2_jax.generation.search import SearchOutput, beam_search, sample_search
from blip2_jax.models.blip2 import Blip2ForConditionalGeneration
from blip2_jax.models.config import OPTConfig
from blip2_jax.models.opt import position_ids_from_mask


def _llm_inputs(module: Blip2ForConditionalGeneration, pixel_values: jax.Array, input_ids: jax.Array,
                attention_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    image_embeds = module.encode_image(pixel_values)
    return module.embed_prompt(input_ids, attention_mask, module.language_inputs(module.query_features(image_embeds)))


def _opt_prefill(module: Blip2ForConditionalGeneration, pixel_values, input_ids, attention_mask, max_new_tokens):
    embeds, mask = _llm_inputs(module, pixel_values, input_ids, attention_mask)
    b, t = mask.shape
    buffer_mask = jnp.concatenate([mask, jnp.ones((b, max_new_tokens), mask.dtype)], axis=1)
    lm = module.language_model
    logits, cache = lm(embeds, buffer_mask, position_ids=position_ids_from_mask(mask),
                       cache=lm.init_cache(b, t + max_new_tokens), cache_index=0, logits_from=t - 1)
    return logits[:, 0], cache, {"buffer_mask": buffer_mask, "next_position": jnp.sum(mask, axis=1)}


def _opt_step(module: Blip2ForConditionalGeneration, token, cache, i, context, offset):
    lm = module.language_model
    logits, cache = lm(lm.embed(token[:, None]), context["buffer_mask"],
                       position_ids=(context["next_position"] + i)[:, None], cache=cache, cache_index=offset + i)
    return logits[:, 0], cache


def _t5_prefill(module: Blip2ForConditionalGeneration, pixel_values, input_ids, attention_mask, max_new_tokens):
    embeds, mask = _llm_inputs(module, pixel_values, input_ids, attention_mask)
    lm = module.language_model
    encoded = lm.encode(embeds, mask)
    start = jnp.full((mask.shape[0], 1), module.config.text.decoder_start_token_id, jnp.int32)
    logits, cache = lm.decode(start, encoded, mask, cache=lm.init_cache(mask.shape[0], max_new_tokens),
                              cache_index=0)
    return logits[:, 0], cache, {"encoded": encoded, "mask": mask}


def _t5_step(module: Blip2ForConditionalGeneration, token, cache, i, context, offset):
    del offset  # the decoder's own cache starts at the decoder start token
    logits, cache = module.language_model.decode(token[:, None], context["encoded"], context["mask"], cache=cache,
                                                 cache_index=i + 1)
    return logits[:, 0], cache


def generate(params: Any, pixel_values: jax.Array, input_ids: jax.Array, attention_mask: jax.Array,
             rng: jax.Array | None = None, *, model: Blip2ForConditionalGeneration,
             config: GenerationConfig) -> SearchOutput:
    """Generate for a batch of images and prompts; a pure function (jit it with `generate_fn`).

    pixel_values (B,H,W,3); input_ids/attention_mask (B,P) as `transformers`' Blip2Processor
    builds them: with `image_token_index` set they start with the Q `<image>` tokens. OPT
    prompts are left-padded; T5 prompts may be padded either side. Returns tokens (B,R,L), the
    generated ids only, and their lengths and scores.
    """
    text = model.config.text
    eos = text.eos_token_id if config.eos_token_id is None else config.eos_token_id
    pad = text.pad_token_id if config.pad_token_id is None else config.pad_token_id
    variables = {"params": params}
    decoder_only = isinstance(text, OPTConfig)
    prefill, step_method = (_opt_prefill, _opt_step) if decoder_only else (_t5_prefill, _t5_step)
    logits, cache, context = model.apply(variables, pixel_values, input_ids, attention_mask, config.max_new_tokens,
                                         method=prefill)
    offset = context["buffer_mask"].shape[1] - config.max_new_tokens if decoder_only else 0
    prompt_ids = input_ids.astype(jnp.int32) if decoder_only else jnp.full(
        (input_ids.shape[0], 1), text.decoder_start_token_id, jnp.int32)

    copies = config.num_beams if config.num_beams > 1 else config.num_return_sequences
    if copies > 1:
        repeat = functools.partial(jnp.repeat, repeats=copies, axis=0)
        logits, context, prompt_ids = repeat(logits), jax.tree.map(repeat, context), repeat(prompt_ids)
        cache = jax.tree.map(lambda x: jnp.repeat(x, copies, axis=1), cache)

    def step(token, cache, i):
        return model.apply(variables, token, cache, i, context, offset, method=step_method)

    if config.num_beams > 1:
        return beam_search(step, logits, cache, prompt_ids, config, eos=eos, pad=pad)
    out = sample_search(step, logits, cache, prompt_ids, config, eos=eos, pad=pad, rng=rng)
    b, r = input_ids.shape[0], config.num_return_sequences
    return jax.tree.map(lambda x: x.reshape(b, r, *x.shape[2:]), out)


def generate_fn(model: Blip2ForConditionalGeneration, config: GenerationConfig) -> Callable[..., SearchOutput]:
    """`generate` compiled for one model and setting: (params, pixel_values, input_ids, attention_mask[, rng])."""
    return jax.jit(functools.partial(generate, model=model, config=config))
