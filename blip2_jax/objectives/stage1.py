"""BLIP-2 stage-1 objectives over the global batch: ITC, ITM with hard-negative mining, ITG.

Every array here is the *global* batch: under `jax.jit` over a mesh with the batch sharded,
XLA inserts the collectives, so ITC compares each image with every text of the global batch
and hard negatives are drawn from all of it (LAVIS's all-gathers, spec §5.1-5.2). Unlike LAVIS
on more than one GPU, the gradient is the exact gradient of the global loss: LAVIS detaches the
gathered ITC features (its gradient reaches only each rank's own rows), we do not
(design decision 5). On one device the two agree. Nothing is frozen here: the train step
differentiates only the trainable tree (`train/partition.py`), which decides whether the ViT trains.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from blip2_jax.data.spec import BatchSpec, field
from blip2_jax.data.tokenizers import IGNORE
from blip2_jax.models.blip2 import Blip2Stage1


def batch_spec(image_size: int, text_length: int, *, positives: bool = False) -> BatchSpec:
    """`image` (S,S,3) float32, normalised; `text_ids`/`text_mask` (L,) int32, [CLS] first (ITG
    puts [DEC] there). With `positives`, `image_id` () int32: rows of equal id are positives for
    ITC and are never drawn as ITM's hard negatives (LAVIS's retrieval fine-tuning)."""
    spec = {"image": field((image_size, image_size, 3), "float32"), "text_ids": field((text_length,), "int32"),
            "text_mask": field((text_length,), "int32")}
    return {**spec, "image_id": field((), "int32")} if positives else spec


@dataclasses.dataclass(frozen=True)
class Stage1Config:
    """Loss settings (defaults: LAVIS@HEAD, spec §5 and §13)."""

    itc_label_smoothing: float = 0.1
    itg_label_smoothing: float = 0.1
    # 'head': positives' logits set to -10000 before the softmax (LAVIS since 2023-07);
    # 'paper': softmax + 1e-4 with positives zeroed (the code the paper was trained with).
    hard_negative_weights: str = "head"
    temp_clamp: tuple[float, float] | None = None  # BLIP-2 does not clamp; BLIP/ALBEF used (0.001, 0.5)
    bos_token_id: int = 30522  # [DEC]
    pad_token_id: int = 0
    # L = itc_weight * ITC + itm_weight * ITM + itg_weight * ITG; LAVIS sums them (all 1). Weight 0
    # drops a term, e.g. the paper's Table 6 ablation (ITC+ITM without ITG).
    itc_weight: float = 1.0
    itm_weight: float = 1.0
    itg_weight: float = 1.0

    def __post_init__(self):
        if self.hard_negative_weights not in ("head", "paper"):
            raise ValueError(f"hard_negative_weights must be 'head' or 'paper', got {self.hard_negative_weights!r}")


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean over rows of -sum_j targets_ij log softmax(logits)_ij (float32)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.sum(targets * logp, axis=-1))


def positives(batch_size: int, image_ids: jax.Array | None) -> jax.Array:
    """(N,N) bool: which (image, text) pairs of the global batch are positives. Without image ids
    only the diagonal; with them, every pair showing the same image (retrieval fine-tuning)."""
    if image_ids is None:
        return jnp.eye(batch_size, dtype=bool)
    return image_ids[:, None] == image_ids[None, :]


def itc_similarity(image_feats: jax.Array, text_feats: jax.Array) -> jax.Array:
    """sims[i, j] = max over queries of <image_feats[i, q], text_feats[j]> (N_img, N_txt)."""
    return jnp.max(jnp.einsum("iqe,je->ijq", image_feats, text_feats, preferred_element_type=jnp.float32), -1)


def itc_loss(sims: jax.Array, temp: jax.Array, positive: jax.Array, label_smoothing: float) -> jax.Array:
    """Symmetric contrastive loss with label smoothing; positives share their target mass
    (the diagonal alone during pre-training; same-image pairs with image ids)."""
    n = sims.shape[0]
    target = positive.astype(jnp.float32)
    target = (1.0 - label_smoothing) * target / jnp.sum(target, axis=-1, keepdims=True) + label_smoothing / n
    i2t, t2i = sims / temp, sims.T / temp
    return 0.5 * (soft_cross_entropy(i2t, target) + soft_cross_entropy(t2i, target.T))


def hard_negative_indices(rng: jax.Array, sims_over_temp: jax.Array, positive: jax.Array,
                          weights: str) -> tuple[jax.Array, jax.Array]:
    """Sample one hard negative per row from the softmax of the ITC logits (no gradient).

    Returns (negative image for each text, negative text for each image), each (N,) indices into
    the global batch. Positives are never drawn (their probability is exactly 0).
    """
    s_i2t = jax.lax.stop_gradient(sims_over_temp).astype(jnp.float32)
    rng_img, rng_txt = jax.random.split(rng)

    def logits(s: jax.Array, pos: jax.Array) -> jax.Array:
        if weights == "head":  # LAVIS@HEAD: positive logits -10000, then softmax
            return jnp.where(pos, -10000.0, s)
        w = jax.nn.softmax(s, axis=-1) + 1e-4  # LAVIS@paper: softmax + 1e-4, positives zeroed
        return jnp.where(pos, -jnp.inf, jnp.log(w))

    neg_image = jax.random.categorical(rng_img, logits(s_i2t.T, positive.T), axis=-1)
    neg_text = jax.random.categorical(rng_txt, logits(s_i2t, positive), axis=-1)
    return neg_image, neg_text


def itm_pairs(neg_image: jax.Array, neg_text: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The 3N ITM pairs as (image index, text index, label): positives, (text, hard-negative
    image), (image, hard-negative text)."""
    idx = jnp.arange(neg_image.shape[0])
    images = jnp.concatenate([idx, neg_image, idx])
    texts = jnp.concatenate([idx, idx, neg_text])
    labels = jnp.concatenate([jnp.ones_like(idx), jnp.zeros_like(idx), jnp.zeros_like(idx)])
    return images, texts, labels


def token_cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
    """torch `cross_entropy(label_smoothing=e, ignore_index=-100)`: mean over non-ignored tokens of
    (1-e)(-log p_y) + e * mean_c(-log p_c)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    valid = labels != IGNORE
    nll = -jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    per_token = (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(logp, axis=-1)
    return jnp.sum(jnp.where(valid, per_token, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def itg_inputs(input_ids: jax.Array, config: Stage1Config) -> tuple[jax.Array, jax.Array]:
    """Decoder ids ([CLS] -> [DEC]) and labels (pad ignored); the loss shifts them by one."""
    dec_ids = input_ids.at[:, 0].set(config.bos_token_id)
    return dec_ids, jnp.where(input_ids == config.pad_token_id, IGNORE, dec_ids)


def stage1_loss(params: Any, batch: Mapping[str, jax.Array], rng: jax.Array, *, model: Blip2Stage1,
                config: Stage1Config = Stage1Config(), deterministic: bool = False,
                negatives: tuple[jax.Array, jax.Array] | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L = ITC + ITM + ITG on one global batch (a pure function to `jax.jit` over a mesh).

    batch: `image` (N,H,W,3), `text_ids` (N,L) ([CLS] ... [SEP] [PAD]...), `text_mask` (N,L),
    optionally `image_id` (N,) for the same-image positives of retrieval fine-tuning.
    `negatives` fixes the hard negatives (image per text, text per image) instead of sampling.
    Returns the total loss and the metrics `loss_itc`, `loss_itm`, `loss_itg`, `temp`.
    """
    rng_neg, rng_drop = jax.random.split(rng)
    # a dropout RNG marks a training pass (layers.Dense: LoRA dropout)
    drop = lambda i: {} if deterministic else {"dropout": jax.random.fold_in(rng_drop, i)}  # noqa: E731
    variables = {"params": params}
    ids, mask = batch["text_ids"], batch["text_mask"]
    n = ids.shape[0]

    image_embeds = model.apply(variables, batch["image"], method=model.encode_image, rngs=drop(4))
    query_output, query_kv = model.apply(variables, image_embeds, deterministic=deterministic,
                                         method=model.query_pass, rngs=drop(0))
    image_feats = model.apply(variables, query_output, method=model.project_queries)
    text_feats = model.apply(variables, ids, mask, deterministic=deterministic, method=model.text_features,
                             rngs=drop(1))

    temp = params["temp"]
    if config.temp_clamp is not None:
        temp = jnp.clip(temp, *config.temp_clamp)
    sims = itc_similarity(image_feats, text_feats)
    positive = positives(n, batch.get("image_id"))
    loss_itc = itc_loss(sims, temp, positive, config.itc_label_smoothing)

    if negatives is None:
        negatives = hard_negative_indices(rng_neg, sims / temp, positive, config.hard_negative_weights)
    images, texts, labels = itm_pairs(*negatives)
    # each image's cross-attention keys/values are projected once, not once per pair it is in
    itm_logits = model.apply(variables, image_embeds, ids[texts], mask[texts], image_rows=images,
                             deterministic=deterministic, method=model.itm, rngs=drop(2))
    loss_itm = soft_cross_entropy(itm_logits, jax.nn.one_hot(labels, 2))

    dec_ids, lm_labels = itg_inputs(ids, config)
    lm_logits = model.apply(variables, dec_ids, mask, query_kv, deterministic=deterministic,
                            method=model.itg_logits, rngs=drop(3))
    loss_itg = token_cross_entropy(lm_logits[:, :-1], lm_labels[:, 1:], config.itg_label_smoothing)

    loss = config.itc_weight * loss_itc + config.itm_weight * loss_itm + config.itg_weight * loss_itg
    return loss, {"loss": loss, "loss_itc": loss_itc, "loss_itm": loss_itm, "loss_itg": loss_itg, "temp": temp}
