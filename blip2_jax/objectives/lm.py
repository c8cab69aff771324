"""Text-only causal language modelling of a BLIP-2 model's OPT: how `blip2-jax demo` makes the
language model that BLIP-2 then freezes (the published models start from a pretrained OPT).

Batch (`batch_spec`): `text_ids`/`text_mask` (B,L), BOS + text + "\\n", right-padded
(`tokenizers.opt_text`), and `labels` (B,L) from `data.tokenizers.opt_labels` (a batch without them
counts every text token): a record with a prompt has a loss only on the text after it
(the demo's answers after "question: <q> answer:"; a loss over every token is
dominated by the unpredictable questions, and the answers, 1 token in 12, are learnt far more
slowly). Optional `context_ids`/`context_mask` (B,C), left-padded, come before BOS, where stage 2
puts the image's queries: the demo's captions, so that the LM learns to read them from the slot
the visual prompt then takes. They are no targets. Position t predicts token t+1; padding is no
target, BOS never is.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from blip2_jax.data.spec import BatchSpec, field
from blip2_jax.models.blip2 import Blip2ForConditionalGeneration
from blip2_jax.objectives.stage1 import IGNORE, token_cross_entropy


def batch_spec(text_length: int, *, context_length: int = 0) -> BatchSpec:
    """`text_ids`, `text_mask` and `labels` (L,) int32; with a context, `context_ids` and
    `context_mask` (C,) int32."""
    spec = {k: field((text_length,), "int32") for k in ("text_ids", "text_mask", "labels")}
    if context_length:
        spec.update({k: field((context_length,), "int32") for k in ("context_ids", "context_mask")})
    return spec


def _lm_logits(module: Blip2ForConditionalGeneration, batch: Mapping[str, jax.Array], deterministic: bool) -> jax.Array:
    """Logits at the text's positions, after the context's (if any) as stage 2 puts its queries."""
    lm = module.language_model
    embeds, mask = lm.embed(batch["text_ids"]), batch["text_mask"]
    if "context_ids" in batch:
        embeds = jnp.concatenate([lm.embed(batch["context_ids"]), embeds], axis=1)
        mask = jnp.concatenate([batch["context_mask"], mask], axis=1)
    return lm(embeds, mask, deterministic=deterministic, logits_from=embeds.shape[1] - batch["text_ids"].shape[1])[0]


def lm_loss(params: Any, batch: Mapping[str, jax.Array], rng: jax.Array, *, model: Blip2ForConditionalGeneration,
            deterministic: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean next-token cross-entropy over the real tokens after BOS; metrics `loss`, `accuracy`."""
    if model.config.text.is_encoder_decoder:
        raise ValueError(f"the text-only LM objective trains a decoder-only LM, got {model.config.text!r}")
    rngs = {} if deterministic else {"dropout": rng}  # a dropout RNG marks a training pass (layers.Dense)
    logits = model.apply({"params": params}, batch, deterministic, method=_lm_logits, rngs=rngs)[:, :-1]
    labels = batch["labels"] if "labels" in batch else jnp.where(batch["text_mask"] == 0, IGNORE, batch["text_ids"])
    targets = labels[:, 1:]
    loss = token_cross_entropy(logits, targets, 0.0)
    real = targets != IGNORE
    accuracy = jnp.sum((jnp.argmax(logits, -1) == targets) & real) / jnp.maximum(jnp.sum(real), 1)
    return loss, {"loss": loss, "accuracy": accuracy}
