"""AdamW with LAVIS's parameter groups and learning-rate schedules, as one optax transformation.

LAVIS trains with `torch.optim.AdamW` over parameter groups (decay / no decay, per-ViT-layer LR
scales) and an epoch-based warmup+cosine schedule; the paper describes a per-step one (spec §9.3).
Both are reproduced here so that a run can follow either. The optimizer is built for the
*trainable* tree only (design decision 3), whose paths mirror Hugging Face names; blocks created by
`layers.stack_layers` (modules named `layers`, T5's `block`) carry a leading layer axis, which the
weight-decay and layer-decay rules see through.

Config fields (`default_config()` is LAVIS's stage-1 recipe, `pretrain_stage1.yaml`):
  lr: peak learning rate (LAVIS `init_lr`; 1e-4).
  min_lr: learning rate the cosine ends at (1e-5; paper stage 2: 5e-5).
  warmup_lr: learning rate at step 0, rising linearly to `lr` (1e-6).
  warmup_steps: length of the linear warmup in optimizer steps (LAVIS 5000; paper 2000).
  schedule: 'lavis_epoch' (LAVIS's `linear_warmup_cosine_lr`: warmup inside epoch 0 only, then a
    cosine over epochs that is constant within each epoch), 'cosine' (the paper's: per-step warmup,
    then cosine to `min_lr` at `total_steps`) or 'constant' (`lr`).
  steps_per_epoch: optimizer steps per epoch ('lavis_epoch' only; set it from the data size).
  max_epoch: epochs of the cosine ('lavis_epoch' only; 10).
  total_steps: where the cosine reaches `min_lr` ('cosine' only; paper stage 1: 250k).
  b1, b2, eps: Adam's (0.9, 0.999, 1e-8) as LAVIS runs; the paper states b2 = 0.98.
  weight_decay: decoupled decay coefficient, applied as p -= lr * weight_decay * p (0.05).
  no_decay: which parameters are not decayed. 'head' (LAVIS today, `Blip2Base.get_optimizer_params`):
    exactly one dimension, or named `bias`; so the 0-d `temp` and the 3-d `query_tokens` decay.
    'paper' (LAVIS's runner when the paper was written): fewer than two dimensions, or a bias or
    LayerNorm parameter; so `temp` does not decay.
  grad_clip_norm: clip gradients to this global norm; None (LAVIS) does not clip.
  grad_accum_steps: average the gradients of this many calls before one optimizer step (1).
  layer_decay: ViT layer-wise LR decay (e.g. 0.95 for fine-tuning; None = off). Block i gets the LR
    scale decay^(num_layers - i), the embeddings decay^(num_layers + 1), all else 1. LAVIS computes
    these scales but no scheduler reads them, so in LAVIS they have no effect; here they do.
All step counts are optimizer updates, i.e. after gradient accumulation.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from ml_collections import config_dict

from blip2_jax.errors import UserError

PyTree = Any

# Module names under which `layers.stack_layers` stacks blocks on a leading layer axis.
STACKED_MODULES = frozenset({"layers", "block"})
VIT_BLOCKS = ("vision_model", "encoder", "layers")
# LAVIS's layer 0 of the ViT: patch/position/class embeddings and CLIP's `ln_pre`.
VIT_STEM = (("vision_model", "embeddings"), ("vision_model", "pre_layernorm"))


def default_config() -> ml_collections.ConfigDict:
    """LAVIS's stage-1 recipe (spec §9.2-9.3); `steps_per_epoch` must be set for the data used."""
    return ml_collections.ConfigDict(dict(
        lr=1e-4,
        min_lr=1e-5,
        warmup_lr=1e-6,
        warmup_steps=5000,
        schedule="lavis_epoch",
        steps_per_epoch=config_dict.placeholder(int),
        max_epoch=10,
        total_steps=config_dict.placeholder(int),
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.05,
        no_decay="head",
        grad_clip_norm=config_dict.placeholder(float),
        grad_accum_steps=1,
        layer_decay=config_dict.placeholder(float),
    ))


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """The learning rate as a function of the optimizer step (also what to log as a metric)."""
    lr, warmup_lr, min_lr, warmup_steps = config.lr, config.warmup_lr, config.min_lr, config.warmup_steps
    if config.schedule == "constant":
        return optax.constant_schedule(lr)
    if config.schedule == "cosine":
        if config.total_steps is None or config.total_steps <= warmup_steps:
            raise UserError(f"config.optim.schedule 'cosine' needs total_steps > warmup_steps={warmup_steps}, "
                            f"got total_steps={config.total_steps}")
        return optax.warmup_cosine_decay_schedule(warmup_lr, lr, warmup_steps, config.total_steps, min_lr)
    if config.schedule == "lavis_epoch":
        steps_per_epoch, max_epoch = config.steps_per_epoch, config.max_epoch
        if steps_per_epoch is None or steps_per_epoch < 1 or max_epoch is None or max_epoch < 1:
            raise UserError("config.optim.schedule 'lavis_epoch' needs steps_per_epoch >= 1 and max_epoch >= 1, "
                            f"got steps_per_epoch={steps_per_epoch}, max_epoch={max_epoch}")

        def schedule(step: jax.typing.ArrayLike) -> jax.Array:
            epoch, i = jnp.divmod(jnp.asarray(step), steps_per_epoch)
            # Warmup only ever happens in epoch 0: if it is longer than an epoch, lr never peaks.
            warmup = jnp.minimum(lr, warmup_lr + (lr - warmup_lr) * i / max(warmup_steps, 1))
            cosine = min_lr + (lr - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / max_epoch))
            return jnp.where(epoch == 0, warmup, cosine)

        return schedule
    raise UserError(f"config.optim.schedule must be 'lavis_epoch', 'cosine' or 'constant', got {config.schedule!r}")


def _names(path: tuple) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _layer_ndim(names: tuple[str, ...], ndim: int) -> int:
    """Dimensions of one layer's tensor: a stacked leaf has an extra leading layer axis."""
    return ndim - 1 if STACKED_MODULES.intersection(names[:-1]) else ndim


def _is_layer_norm(name: str) -> bool:
    return "layernorm" in name.lower().replace("_", "")


def _decays(names: tuple[str, ...], ndim: int, rule: str) -> bool:
    ndim = _layer_ndim(names, ndim)
    if rule == "head":
        # LAVIS: `len(p.shape) == 1 or name.endswith(".bias")`.
        return ndim != 1 and names[-1] != "bias"
    if rule == "paper":
        # LAVIS: `p.ndim < 2 or "bias" in name or "ln" in name or "bn" in name`. Its "ln" hits exactly
        # its LayerNorm modules (ln_vision, CLIP's ln_pre/ln_1/ln_2), which here are named
        # post_layernorm, pre_layernorm, layer_norm1/2 (and BERT's LayerNorm, Q-Former layernorm), so
        # the test is on module names containing "layernorm" up to case and underscores; BLIP-2 has
        # no BatchNorm ("bn"). "bias" is a substring test on every name, as in LAVIS. (Shapes are
        # Hugging Face's: CLIP ViT-L's class embedding, (D,) in LAVIS, is (1, 1, D) here and decays.)
        return ndim >= 2 and not any("bias" in n or _is_layer_norm(n) for n in names)
    raise ValueError(f"unknown no_decay rule {rule!r}; expected 'head' or 'paper'")


def weight_decay_mask(params: PyTree, rule: str) -> PyTree:
    """A tree of bools like `params`: True where weight decay applies under `rule`."""
    return jax.tree_util.tree_map_with_path(lambda p, x: _decays(_names(p), np.ndim(x), rule), params)


def layer_decay_scales(params: PyTree, decay: float) -> PyTree:
    """Per-leaf LR scales for ViT layer-wise decay: float32 arrays broadcastable against each leaf.

    LAVIS's layer id is 0 for the stem, i + 1 for block i, and its scale decay^(num_layers + 1 - id);
    the stacked ViT blocks get one scale per slice of their leading layer axis.
    """
    flat = {_names(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    depths = {np.shape(x)[0] for names, x in flat.items() if names[:3] == VIT_BLOCKS}
    if len(depths) > 1:
        raise ValueError(f"ViT block leaves disagree on the number of layers: {sorted(depths)}")
    num_layers = depths.pop() if depths else None

    def scale(path: tuple, x: Any) -> np.ndarray:
        names = _names(path)
        if names[:3] == VIT_BLOCKS:
            layer_ids = np.arange(1, num_layers + 1).reshape((num_layers,) + (1,) * (np.ndim(x) - 1))
            return (decay ** (num_layers + 1.0 - layer_ids)).astype(np.float32)
        if names[:2] in VIT_STEM:
            if num_layers is None:
                raise ValueError(f"layer decay of {'/'.join(names)} needs the ViT blocks "
                                 f"({'/'.join(VIT_BLOCKS)}) in the trainable tree to know the depth")
            return np.float32(decay ** (num_layers + 1))
        return np.float32(1.0)

    return jax.tree_util.tree_map_with_path(scale, params)


def scale_by_layer_decay(scales: PyTree) -> optax.GradientTransformation:
    """Multiplies each update by its `layer_decay_scales` entry. Placed after the learning rate it
    equals a per-layer learning rate (weight decay included), as LAVIS's `lr_scale` groups intend;
    on the gradients it would be undone by Adam's normalisation."""

    def update(updates: PyTree, state: optax.EmptyState, params: PyTree | None = None):
        del params
        return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(config: ml_collections.ConfigDict, trainable_params: PyTree) -> optax.GradientTransformation:
    """AdamW as `torch.optim.AdamW` (bias-corrected, decoupled decay p -= lr * wd * p) over
    `trainable_params`, with the configured schedule, no-decay rule, clipping, layer decay and
    gradient accumulation. Its state holds leaves for `trainable_params` only."""
    if config.grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be >= 1, got {config.grad_accum_steps}")
    transforms: list[optax.GradientTransformation] = []
    if config.grad_clip_norm is not None:
        transforms.append(optax.clip_by_global_norm(config.grad_clip_norm))
    transforms.append(optax.adamw(
        learning_rate_schedule(config), b1=config.b1, b2=config.b2, eps=config.eps,
        weight_decay=config.weight_decay, mask=weight_decay_mask(trainable_params, config.no_decay)))
    if config.layer_decay is not None:
        transforms.append(scale_by_layer_decay(layer_decay_scales(trainable_params, config.layer_decay)))
    tx = optax.chain(*transforms)
    if config.grad_accum_steps > 1:
        # Clipping, Adam and the schedule see the mean gradient once every `grad_accum_steps` calls.
        tx = optax.MultiSteps(tx, every_k_schedule=config.grad_accum_steps).gradient_transformation()
    return tx
