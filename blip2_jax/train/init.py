"""Where a fresh run's weights come from, placed straight into the layout's shardings.

A run that finds a checkpoint in its workdir resumes from it (`loop.py`) and never comes here.
Otherwise the starting weights are, in this order:

  1. `init.hf`: a Hugging Face BLIP-2 checkpoint (directory or hub id) of exactly `config.model`;
  2. `init.checkpoint`: a model checkpoint (`blip2-jax convert`) or another run's workdir that holds
     this stage's architecture with exactly `config.model`;
     both but for the image size (fine-tuning at 364/490 px from 224 px weights resizes the ViT
     position table), both read shard by shard into the layout's shardings (`weights.load`);
  3. a random init from `config.seed`, then for stage 1 with `init.bert` the Q-Former (and its text
     side) from BERT;
  4. for stage 2 with `init.stage1`, on top of any of the above: the Q-Former query path and
     `ln_vision` of a stage-1 run (`weights/stage1_to_stage2.py`); an InstructBLIP also takes its
     Q-Former's text side from it, and only that when 1 or 2 gave the query path.

InstructBLIP is instruction-tuned from BLIP-2 (Dai et al. 2023): for an instruction-aware stage 2,
1 and 2 may also hold the same model without instruction awareness (a BLIP-2 stage-2 checkpoint);
its leaves are read into the InstructBLIP's and the Q-Former's text side, which it lacks, comes
from `init.stage1`, then required.

1-3 are exclusive; `check_init` refuses a config that names two of them or a source its stage
cannot use, before the workdir exists. The frozen towers are then cast to `config.frozen_dtype`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn
from flax import traverse_util

from blip2_jax.errors import UserError
from blip2_jax.models import blip2, lora
from blip2_jax.train.partition import cast_frozen, merge, partition
from blip2_jax.weights.bert_init import init_from_bert, load_bert
from blip2_jax.weights.load import check_like, load, open_source
from blip2_jax.weights.stage1_to_stage2 import load_stage1, stage1_name, stage2_from_stage1


BERT_PARTS = ("embeddings", "qformer", "cls")  # the stage-1 subtrees BERT initialises


def check_init(config: ml_collections.ConfigDict) -> None:
    """What the config alone says about the starting weights (cheap: opens nothing)."""
    given = [k for k in ("hf", "checkpoint", "bert") if config.init[k]]
    if len(given) > 1:
        raise UserError(f"init.{' and init.'.join(given)} each name the starting weights; set one")
    if config.init.stage1 and config.stage != "stage2":
        raise UserError("init.stage1 starts stage 2 from a stage-1 run; a stage-1 Q-Former starts from init.bert")
    if config.init.bert and config.stage != "stage1":
        raise UserError("init.bert initialises a stage-1 Q-Former; stage 2 starts from init.stage1")


def initial_params(config: ml_collections.ConfigDict, model: nn.Module, model_cfg: Any, patterns: Any,
                   shardings: tuple[Any, Any]) -> tuple[Any, Any]:
    """(trainable, frozen) from the configured source (the order above), placed with `shardings`."""
    check_init(config)
    trainable_sh, frozen_sh = shardings

    def place(params):
        trainable, frozen = partition(params, patterns)
        return jax.device_put(trainable, trainable_sh), jax.device_put(frozen, frozen_sh)

    if config.init.hf or config.init.checkpoint:  # 1, 2: read straight into the shardings, no host copy
        trainable, frozen = partition(_pretrained(config, model_cfg, shardings), patterns)
    else:  # 3
        init_fn = jax.jit(lambda rng: partition(nn.unbox(blip2.init(model_cfg, rng, model)["params"]), patterns),
                          out_shardings=(trainable_sh, frozen_sh))
        trainable, frozen = init_fn(jax.random.PRNGKey(config.seed))
        if config.init.bert:  # only the Q-Former's text side moves to the host, not the ViT
            params = merge(trainable, frozen)
            text = jax.device_get({k: params[k] for k in BERT_PARTS})
            text = init_from_bert(text, load_bert(config.init.bert), model_cfg.qformer)
            trainable, frozen = place({**params, **text})
    if config.init.stage1:  # 4: only the query path moves to the host; the towers stay where they are
        text_side_only = model_cfg.instruction_aware and bool(config.init.hf or config.init.checkpoint)
        trainable, frozen = place(stage2_from_stage1(load_stage1(config.init.stage1), merge(trainable, frozen),
                                                     text_side_only=text_side_only))
    return trainable, cast_frozen(frozen, jnp.dtype(config.frozen_dtype))


def _pretrained(config: ml_collections.ConfigDict, model_cfg: Any, shardings: tuple[Any, Any]) -> Any:
    """The parameters of `init.hf` or `init.checkpoint` in `shardings` (trainable, frozen): this stage's architecture
    with exactly `config.model`, but for the image size (the ViT position table is resized)."""
    field = "hf" if config.init.hf else "checkpoint"
    source = open_source(config.init[field])
    want = blip2.stage_architecture(config.stage, model_cfg)
    plain_cfg = without_instructions(model_cfg, source.config)
    if model_cfg.instruction_aware and source.architecture == blip2.stage_architecture(config.stage, plain_cfg):
        if not config.init.stage1:
            raise UserError(f"init.{field} {source.name} holds a {source.architecture}, which has no Q-Former text "
                            f"side for the instruction: an {want} takes it from init.stage1 (a stage-1 run); set it")
        check_like(source, plain_cfg, "config.model without instruction awareness")
        return _instruction_aware(source, plain_cfg, model_cfg, merge(*shardings))
    if source.architecture != want:
        raise UserError(f"init.{field} {source.name} holds a {source.architecture}; {config.stage} trains a {want}")
    adapt = model_cfg.lora.enabled and not source.config.lora.enabled  # new adapters on the source's weights
    quantize = bool(model_cfg.int8) and not source.config.int8  # int8 kernels computed from the source's
    base_cfg = model_cfg.replace(lora=source.config.lora if adapt else model_cfg.lora,
                                 int8=source.config.int8 if quantize else model_cfg.int8)
    check_like(source, base_cfg, "config.model" + "".join(f" without {k}" for k, on in (("lora", adapt),
                                                                                         ("int8", quantize)) if on))
    placed = merge(*shardings)
    params = load(source, shardings=lora.strip(placed) if adapt else placed, like=base_cfg,
                  int8=model_cfg.int8 if quantize else ()).params
    if adapt:
        return with_adapters(params, model_cfg.lora, placed, jax.random.PRNGKey(config.seed), model_cfg.weight_dtype)
    return params


def with_adapters(params: Any, config: lora.LoraConfig, shardings: Any, rng: jax.Array, dtype: Any) -> Any:
    """`params` (placed; int8 kernels too) with fresh LoRA adapters in `dtype` made in their
    shardings: only the adapters are computed, the placed weights are not copied."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)

    def adapters():
        full = traverse_util.flatten_dict(lora.add(abstract, config, rng, dtype), sep="/")
        return {p: v for p, v in full.items() if lora.is_adapter_leaf(p)}

    flat_sh = traverse_util.flatten_dict(shardings, sep="/")
    made = jax.jit(adapters, out_shardings={p: flat_sh[p] for p in jax.eval_shape(adapters)})()
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(params, sep="/"), **made}, sep="/")


def without_instructions(model_cfg: Any, source_cfg: Any) -> Any:
    """The BLIP-2 stage-2 model an InstructBLIP `model_cfg` is tuned from: no instruction awareness,
    a Q-Former without a text side (so without a vocabulary of its own), and the source's prompt
    layout (`image_token_index` places the queries; it holds no parameter)."""
    return model_cfg.replace(instruction_aware=False, image_token_index=source_cfg.image_token_index,
                             qformer=dataclasses.replace(model_cfg.qformer, use_qformer_text_input=False,
                                                         vocab_size=source_cfg.qformer.vocab_size))


def _instruction_aware(source: Any, plain_cfg: Any, model_cfg: Any, shardings: Any) -> Any:
    """A BLIP-2 checkpoint's leaves, each read straight into the sharding of its InstructBLIP leaf
    (the Q-Former's input LayerNorm has the name stage 1 gives it, `stage1_name`); the Q-Former's
    text side, which BLIP-2's stage 2 lacks, as zeros until `init.stage1` fills it."""
    flat = traverse_util.flatten_dict(shardings, sep="/")
    plain_model = blip2.build(plain_cfg, source.architecture)
    plain = traverse_util.flatten_dict(blip2.abstract_params(plain_cfg, model=plain_model), sep="/")
    ours = {stage1_name(p): p for p in flat if stage1_name(p) in plain}
    if set(ours) != set(plain):
        raise UserError(f"{source.name}: {sorted(set(plain) - set(ours))[:3]} have no place in {model_cfg}")
    read_back = load(source, shardings=traverse_util.unflatten_dict({q: flat[p] for q, p in ours.items()}, sep="/"),
                     like=plain_cfg).params
    params = {ours[q]: v for q, v in traverse_util.flatten_dict(read_back, sep="/").items()}
    abstract = traverse_util.flatten_dict(blip2.abstract_params(model_cfg, model=blip2.build(
        model_cfg, blip2.stage_architecture("stage2", model_cfg))), sep="/")
    rest = [p for p in flat if p not in params]
    params.update(jax.jit(lambda: {p: jnp.zeros(abstract[p].shape, abstract[p].dtype) for p in rest},
                          out_shardings={p: flat[p] for p in rest})())
    return traverse_util.unflatten_dict(params, sep="/")
