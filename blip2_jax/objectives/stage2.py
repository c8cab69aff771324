"""BLIP-2 stage-2 objective: language modelling through a frozen LLM (OPT or FlanT5).

The Q-Former's query outputs, projected to the LLM width, are a soft visual prompt in front of
the text (spec §6.2, §7.2). Nothing is frozen here: the train step differentiates only the
trainable tree (`train/partition.py`), so the frozen LLM passes gradients back to the projection
and the Q-Former, a frozen ViT costs no backward pass, and a fine-tuned ViT trains.

OPT: causal LM over [visual prompt ; BOS prompt text "\\n"], loss on the text tokens (BOS too
with an empty prompt, §13.10). FlanT5: prefix LM, encoder [visual prompt ; prefix], decoder
predicts the suffix. No label smoothing in either (§13.6).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from blip2_jax.data.spec import BatchSpec, field
from blip2_jax.models.blip2 import Blip2ForConditionalGeneration
from blip2_jax.models.config import T5Config
from blip2_jax.models.t5 import shift_right

Instruction = tuple[jax.Array, jax.Array]  # InstructBLIP's Q-Former input: ids and mask (B,I)
from blip2_jax.objectives.stage1 import IGNORE, token_cross_entropy


def batch_spec(image_size: int, text_length: int, model_type: str, instruction_length: int = 0) -> BatchSpec:
    """`image` (S,S,3) float32. Decoder-only (OPT, LLaMA): `text_ids`/`text_mask` (L,) int32 (BOS +
    prompt + text + end, right-padded) and `labels` (L,) int32 (`tokenizers.opt_labels`: prompt and
    padding ignored). FlanT5: `input_ids`/`input_mask` (the encoder's prompt and prefix) and
    `output_ids`/`output_mask` (the decoder's target), each (L,) int32. InstructBLIP (instruction
    tuning) also: `qformer_ids`/`qformer_mask` (I,) int32, the instruction in the Q-Former's BERT
    vocabulary."""
    text = ("input_ids", "input_mask", "output_ids", "output_mask") if model_type == "t5" else \
        ("text_ids", "text_mask", "labels")
    spec = {"image": field((image_size, image_size, 3), "float32"), **{k: field((text_length,), "int32") for k in text}}
    if instruction_length:
        spec.update({k: field((instruction_length,), "int32") for k in ("qformer_ids", "qformer_mask")})
    return spec


@dataclasses.dataclass(frozen=True)
class Stage2Config:
    """Loss settings (defaults: LAVIS, spec §6.2 / §7.2)."""

    label_smoothing: float = 0.0  # LAVIS's OPT and T5 LM losses use none


def _visual_prompt(module: Blip2ForConditionalGeneration, image: jax.Array, instruction: Instruction | None,
                   deterministic: bool) -> jax.Array:
    """Image (B,H,W,3) -> projected query outputs (B,Q,D_llm); InstructBLIP's queries also read the
    instruction. The ViT runs deterministic: BLIP-2's ViTs have no dropout (attention dropout 0,
    LAVIS's drop path 0), frozen or fine-tuned."""
    image_embeds = module.encode_image(image)
    queries = module.query_features(image_embeds, deterministic=deterministic) if instruction is None else \
        module.instruction_features(image_embeds, *instruction, deterministic=deterministic)
    return module.language_inputs(queries)


def _prepend(module: Blip2ForConditionalGeneration, image_inputs: jax.Array, ids: jax.Array,
             mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[visual prompt ; embed(ids)] and [ones ; mask] (LAVIS concatenation; no <image> tokens)."""
    embeds = module.language_model.embed(ids)
    ones = jnp.ones(image_inputs.shape[:2], mask.dtype)
    return (jnp.concatenate([image_inputs.astype(embeds.dtype), embeds], axis=1),
            jnp.concatenate([ones, mask], axis=1))


def _decoder_only_logits(module: Blip2ForConditionalGeneration, image: jax.Array, instruction: Instruction | None,
                         text_ids: jax.Array, text_mask: jax.Array, deterministic: bool) -> jax.Array:
    """Decoder-only logits (B, L+1, V) over [visual prompt ; text] from the last query on: the
    positions that predict text tokens (and the last, which predicts nothing)."""
    visual = _visual_prompt(module, image, instruction, deterministic)
    embeds, mask = _prepend(module, visual, text_ids, text_mask)
    return module.language_model(embeds, mask, deterministic=deterministic, logits_from=visual.shape[1] - 1)[0]


def _t5_logits(module: Blip2ForConditionalGeneration, image: jax.Array, instruction: Instruction | None,
               input_ids: jax.Array, input_mask: jax.Array, decoder_input_ids: jax.Array, decoder_mask: jax.Array,
               deterministic: bool) -> jax.Array:
    """T5 decoder logits (B, T, V): encoder over [visual prompt ; prefix]."""
    embeds, mask = _prepend(module, _visual_prompt(module, image, instruction, deterministic), input_ids, input_mask)
    return module.language_model(embeds, mask, decoder_input_ids, decoder_mask, deterministic=deterministic)


def _logits_and_targets(params: Any, batch: Mapping[str, jax.Array], rng: jax.Array | None, *,
                        model: Blip2ForConditionalGeneration, deterministic: bool) -> tuple[jax.Array, jax.Array]:
    """The LM's logits at the positions that predict text (B, T, V) and the token each predicts
    (B, T; IGNORE where none is a target)."""
    variables = {"params": params}
    # a dropout RNG marks a training pass (layers.Dense: LoRA dropout)
    rngs = {} if rng is None or deterministic else {"rngs": {"dropout": rng}}
    text_cfg = model.config.text
    instruction = (batch["qformer_ids"], batch["qformer_mask"]) if model.config.instruction_aware else None
    if not text_cfg.is_encoder_decoder:  # OPT, LLaMA
        logits = model.apply(variables, batch["image"], instruction, batch["text_ids"], batch["text_mask"],
                             deterministic, method=_decoder_only_logits, **rngs)
        # Shifted causal LM: position t predicts token t+1, so the last query predicts text token 0.
        return logits[:, :-1], batch["labels"]
    if isinstance(text_cfg, T5Config):
        targets = jnp.where(batch["output_mask"] == 0, IGNORE, batch["output_ids"])  # = pad -> -100
        decoder_input_ids = shift_right(targets, text_cfg.decoder_start_token_id, text_cfg.pad_token_id)
        logits = model.apply(variables, batch["image"], instruction, batch["input_ids"], batch["input_mask"],
                             decoder_input_ids, batch["output_mask"], deterministic, method=_t5_logits, **rngs)
        return logits, targets
    raise ValueError(f"stage 2 needs an OPT, LLaMA or T5 language model, got {text_cfg!r}")


def stage2_loss(params: Any, batch: Mapping[str, jax.Array], rng: jax.Array, *,
                model: Blip2ForConditionalGeneration, config: Stage2Config = Stage2Config(),
                deterministic: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Image-conditioned LM loss on one global batch (a pure function to `jax.jit` over a mesh).

    OPT batch: `image` (B,H,W,3), `text_ids`/`text_mask` (B,L) (BOS + prompt + text + "\\n",
    right-padded), `labels` (B,L) from `data.tokenizers.opt_labels`. T5 batch: `image`, `input_ids`/`input_mask`
    (prefix ending in </s>), `output_ids`/`output_mask` (target ending in </s>).
    `rng` drives the Q-Former's and the LLM's dropout (unused when `deterministic`).
    Returns the mean token cross-entropy and the metrics `loss`, `loss_lm`.
    """
    logits, targets = _logits_and_targets(params, batch, rng, model=model, deterministic=deterministic)
    loss = token_cross_entropy(logits, targets, config.label_smoothing)
    return loss, {"loss": loss, "loss_lm": loss}


def sequence_nll(params: Any, batch: Mapping[str, jax.Array], *, model: Blip2ForConditionalGeneration) -> jax.Array:
    """Each row's negative log-likelihood of its target tokens, summed (B,), deterministic: how
    LAVIS's `predict_class` ranks candidate answers (a per-row loss with reduction 'none', which its
    T5 sums over the row's tokens). The batch is the stage-2 batch of `stage2_loss`."""
    logits, targets = _logits_and_targets(params, batch, None, model=model, deterministic=True)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    valid = targets != IGNORE
    nll = -jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0), axis=-1)
