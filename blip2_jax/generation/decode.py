"""BLIP-2 generation: image -> visual prompt -> prefilled LLM cache -> search.

The prompt is prefilled once per image, so the vision tower, the Q-Former and the prompt run B
times, not B*K. Decoder-only (OPT, LLaMA) prompts are left-padded and positions follow the
attention-mask cumsum (spec §13.14; `generate`'s for LLaMA); the prompt's K/V stay one copy per
sample (a prefix every beam attends to) and only the new tokens' cache is per beam, so reordering
beams moves max_new_tokens slots, not the whole prompt. Encoder-decoder (T5) runs the encoder
once, projects every layer's cross-attention K/V of it once per sample (not per beam and step),
and decodes from `decoder_start_token_id`. InstructBLIP's Q-Former also reads the instruction.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from blip2_jax.generation.config import GenerationConfig
from blip2_jax.generation.search import SearchOutput, beam_search, row_keys, sample_search
from blip2_jax.models.attention import CACHE_ROWS_AXIS, cache_shape, position_ids_from_mask
from blip2_jax.models.blip2 import Blip2ForConditionalGeneration, unscan_language_model
from blip2_jax.models.config import Blip2Config

Instruction = tuple[jax.Array, jax.Array]  # InstructBLIP's Q-Former input: ids and mask (B,L)


def _llm_inputs(module: Blip2ForConditionalGeneration, pixel_values: jax.Array, input_ids: jax.Array,
                attention_mask: jax.Array, instruction: Instruction | None) -> tuple[jax.Array, jax.Array]:
    image_embeds = module.encode_image(pixel_values)
    queries = module.query_features(image_embeds) if instruction is None else \
        module.instruction_features(image_embeds, *instruction)
    return module.embed_prompt(input_ids, attention_mask, module.language_inputs(queries))


def _decoder_only_prefill(module: Blip2ForConditionalGeneration, pixel_values, input_ids, attention_mask,
                          max_new_tokens, copies, instruction):
    """The prompt's cache becomes the shared prefix; the new tokens get a cache of their own per row."""
    embeds, mask = _llm_inputs(module, pixel_values, input_ids, attention_mask, instruction)
    b, t = mask.shape
    lm = module.language_model
    logits, prefix = lm(embeds, mask, position_ids=position_ids_from_mask(mask), cache=lm.init_cache(b, t),
                        cache_index=0, logits_from=t - 1)
    rows = {"next_position": jnp.sum(mask, axis=1)}
    shared = {"prefix": prefix, "prefix_mask": mask}
    return logits[:, 0], lm.init_cache(b * copies, max_new_tokens), rows, shared


def _decoder_only_step(module: Blip2ForConditionalGeneration, token, cache, i, rows, shared):
    lm = module.language_model
    own_mask = jnp.ones(cache_shape(cache), jnp.int32)  # the causal mask hides the slots not written yet
    logits, cache = lm(lm.embed(token[:, None]), own_mask, position_ids=(rows["next_position"] + i)[:, None],
                       cache=cache, cache_index=i, prefix=shared["prefix"], prefix_mask=shared["prefix_mask"])
    return logits[:, 0], cache


def _t5_prefill(module: Blip2ForConditionalGeneration, pixel_values, input_ids, attention_mask, max_new_tokens,
                copies, instruction):
    """The encoder runs once and its cross-attention K/V are projected once per sample (shared by
    the beams); the decoder start token's self-attention cache is repeated per row."""
    embeds, mask = _llm_inputs(module, pixel_values, input_ids, attention_mask, instruction)
    lm = module.language_model
    memory = lm.cross_memory(lm.encode(embeds, mask))
    start = jnp.full((mask.shape[0], 1), module.config.text.decoder_start_token_id, jnp.int32)
    logits, cache = lm.decode(start, None, mask, cache=lm.init_cache(mask.shape[0], max_new_tokens), cache_index=0,
                              memory=memory)
    return logits[:, 0], jax.tree.map(lambda x: jnp.repeat(x, copies, axis=CACHE_ROWS_AXIS), cache), {}, \
        {"memory": memory, "mask": mask}


def _t5_step(module: Blip2ForConditionalGeneration, token, cache, i, rows, shared):
    del rows
    logits, cache = module.language_model.decode(token[:, None], None, shared["mask"], cache=cache,
                                                 cache_index=i + 1, memory=shared["memory"])
    return logits[:, 0], cache


def _history(config: Blip2Config, input_ids: jax.Array, attention_mask: jax.Array,
             semantics: str) -> tuple[jax.Array, jax.Array]:
    """The ids the LM's generate held before the first new token, (B,P) with -1 for none, and how
    many of them its lengths count, (B,), in each mode (config.py's docstring).

    transformers: every input id (decoder-only) or the decoder start token, none counted. lavis: a
    dummy BOS (4.33's start for `inputs_embeds` only) or the decoder start token, counted.
    lavis_paper (decoder-only): the prompt's text ids, neither image tokens nor padding, counted.
    """
    text, b = config.text, input_ids.shape[0]
    decoder_only = not text.is_encoder_decoder
    if semantics == "lavis_paper" and decoder_only:
        is_text = (attention_mask == 1) & (input_ids != (-1 if config.image_token_index is None
                                                          else config.image_token_index))
        return jnp.where(is_text, input_ids, -1), jnp.sum(is_text, axis=1, dtype=jnp.int32)
    if semantics == "transformers" and decoder_only:
        return input_ids, jnp.zeros((b,), jnp.int32)
    first = text.bos_token_id if decoder_only else text.decoder_start_token_id
    counted = 0 if semantics == "transformers" else 1
    return jnp.full((b, 1), first, jnp.int32), jnp.full((b,), counted, jnp.int32)


def generate(params: Any, pixel_values: jax.Array, input_ids: jax.Array, attention_mask: jax.Array,
             rng: jax.Array | None = None, *, model: Blip2ForConditionalGeneration, config: GenerationConfig,
             qformer_input_ids: jax.Array | None = None,
             qformer_attention_mask: jax.Array | None = None) -> SearchOutput:
    """Generate for a batch of images and prompts; a pure function (jit it with `generate_fn`).

    pixel_values (B,H,W,3); input_ids/attention_mask (B,P) as `transformers`' Blip2Processor
    builds them: with `image_token_index` set they start with the Q `<image>` tokens. OPT
    prompts are left-padded; T5 prompts may be padded either side. Returns tokens (B,R,L), the
    generated ids only, and their lengths and scores. InstructBLIP also takes the instruction its
    Q-Former reads, `qformer_input_ids`/`qformer_attention_mask` (B,L). Sampling takes `rng`, one
    key or one per sample (B, 2); then copy r of sample b draws with `fold_in(rng[b], r)`, so a
    sample's texts do not depend on the batch it is in.
    """
    text = model.config.text
    eos = text.eos_token_id if config.eos_token_id is None else config.eos_token_id
    pad = text.pad_token_id if config.pad_token_id is None else config.pad_token_id
    # Decoding reads each LLM layer's weights in place: split here (a copy per call) unless the
    # caller holds `decoding_params`.
    model = model.clone(scan_lm_layers=False)
    variables = {"params": unscan_language_model(model.config, params)}
    decoder_only = not text.is_encoder_decoder
    prefill, step_method = (_decoder_only_prefill, _decoder_only_step) if decoder_only else (_t5_prefill, _t5_step)
    instruction = None if qformer_input_ids is None else (qformer_input_ids, qformer_attention_mask)
    copies = config.num_beams if config.num_beams > 1 else config.num_return_sequences
    logits, cache, rows, shared = model.apply(variables, pixel_values, input_ids, attention_mask,
                                              config.max_new_tokens, copies, instruction, method=prefill)
    history, counted = _history(model.config, input_ids.astype(jnp.int32), attention_mask, config.semantics)
    if copies > 1:  # per-row state follows the beams (or samples); `shared` stays one per sample
        repeat = functools.partial(jnp.repeat, repeats=copies, axis=0)
        logits, rows, history, counted = repeat(logits), jax.tree.map(repeat, rows), repeat(history), repeat(counted)
    rng = row_keys(rng, copies)

    def step(token, cache, i):
        return model.apply(variables, token, cache, i, rows, shared, method=step_method)

    if config.num_beams > 1:
        return beam_search(step, logits, cache, history, counted, config, eos=eos, pad=pad)
    out = sample_search(step, logits, cache, history, counted, config, eos=eos, pad=pad, rng=rng)
    b, r = input_ids.shape[0], config.num_return_sequences
    return jax.tree.map(lambda x: x.reshape(b, r, *x.shape[2:]), out)


def decoding_params(model: Blip2ForConditionalGeneration, params: Any) -> Any:
    """`params` on the device in the layout decoding reads (`unscan_language_model`): hold these
    when generating many batches, so no call copies the LLM's layers out of their stack."""
    return jax.jit(functools.partial(unscan_language_model, model.config))(params)


def generate_fn(model: Blip2ForConditionalGeneration, config: GenerationConfig) -> Callable[..., SearchOutput]:
    """`generate` compiled for one model and setting: (params, pixel_values, input_ids, attention_mask[, rng]
    [, qformer_input_ids=, qformer_attention_mask=])."""
    return jax.jit(functools.partial(generate, model=model, config=config))
