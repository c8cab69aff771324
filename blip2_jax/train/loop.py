"""The trainer: mesh -> model -> shardings -> init or resume -> jitted step -> loop.

Resume order (design, style habit 8): a checkpoint in `workdir` > `config.init.hf` (a Hugging
Face BLIP-2 checkpoint) or `config.init.checkpoint` (a model checkpoint from `blip2-jax convert`,
or another run's workdir) > `config.init.bert` (stage 1 from BERT) > random init from the seed; a
fresh stage 2 then takes its Q-Former query path from `config.init.stage1` (a stage-1 workdir).
A run that is killed resumes from its last complete checkpoint and continues the exact loss
curve; SIGTERM (preemption) saves a checkpoint before exiting. Only process 0 writes logs.
"""
from __future__ import annotations

import functools
import json
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import linen as nn
from jax.experimental import multihost_utils

from blip2_jax.checkpoint import Checkpointer
from blip2_jax.convert.bert_init import init_from_bert, load_bert
from blip2_jax.convert.hf_checkpoint import config_differences, load_pretrained
from blip2_jax.convert.model_checkpoint import CheckpointParams
from blip2_jax.convert.stage1_to_stage2 import load_stage1, stage2_from_stage1
from blip2_jax.data.loader import make_loader
from blip2_jax.models import blip2, presets
from blip2_jax.objectives.stage1 import Stage1Config, stage1_loss
from blip2_jax.objectives.stage2 import stage2_loss
from blip2_jax.parallel import mesh as mesh_lib
from blip2_jax.parallel.distributed import initialize
from blip2_jax.train import metrics as metrics_lib
from blip2_jax.train.flops import step_flops
from blip2_jax.train.optim import learning_rate_schedule, make_optimizer
from blip2_jax.train.partition import merge, partition, patterns_for
from blip2_jax.train.state import TrainState
from blip2_jax.train.step import train_step


def build_objective(config: ml_collections.ConfigDict) -> tuple[blip2.Blip2Base, Any, Any]:
    """(model, model config, loss_fn(params, batch, rng)) for `config.stage`."""
    model_cfg = presets.from_config_dict(config.model)
    if config.stage == "stage1":
        model = blip2.Blip2Stage1(model_cfg)
        loss_cfg = Stage1Config(**config.loss.to_dict())
        loss_fn = functools.partial(stage1_loss, model=model, config=loss_cfg)
    elif config.stage == "stage2":
        model = blip2.Blip2ForConditionalGeneration(model_cfg)
        loss_fn = functools.partial(stage2_loss, model=model)
    else:
        raise ValueError(f"config.stage must be 'stage1' or 'stage2', got {config.stage!r}")
    return model, model_cfg, loss_fn


def data_kind(config: ml_collections.ConfigDict, model_cfg) -> str:
    """What the objective reads: 'stage1', 'stage2_opt' or 'stage2_t5'."""
    return config.stage if config.stage == "stage1" else f"stage2_{model_cfg.text.model_type}"


def _initial_params(config, model, model_cfg, patterns, shardings):
    """(trainable, frozen) from the configured source, placed with their shardings."""
    trainable_sh, frozen_sh = shardings

    def place(params):
        trainable, frozen = partition(params, patterns)
        return jax.device_put(trainable, trainable_sh), jax.device_put(frozen, frozen_sh)

    if config.init.stage1 and config.stage != "stage2":
        raise ValueError("init.stage1 starts stage 2 from a stage-1 run; a stage-1 Q-Former starts from init.bert")
    given = [k for k in ("hf", "checkpoint", "bert") if config.init[k]]
    if len(given) > 1:
        raise ValueError(f"init.{' and init.'.join(given)} each name the starting weights; set one")
    if config.init.hf:
        _, params = load_pretrained(config.init.hf, config=model_cfg)
        trainable, frozen = place(params)
    elif config.init.checkpoint:
        trainable, frozen = place(_checkpoint_params(config, model, model_cfg))
    else:
        init_fn = jax.jit(lambda rng: partition(nn.unbox(blip2.init(model_cfg, rng, model)["params"]), patterns),
                          out_shardings=(trainable_sh, frozen_sh))
        trainable, frozen = init_fn(jax.random.PRNGKey(config.seed))
        if config.init.bert:
            if config.stage != "stage1":
                raise ValueError("init.bert initialises a stage-1 Q-Former; stage 2 starts from init.stage1")
            trainable, frozen = place(init_from_bert(jax.device_get(merge(trainable, frozen)),
                                                     load_bert(config.init.bert), model_cfg.qformer))
    if config.init.stage1:  # only the query path moves to the host; the towers stay where they are
        trainable, frozen = place(stage2_from_stage1(load_stage1(config.init.stage1), merge(trainable, frozen)))
    return trainable, frozen


def _checkpoint_params(config, model, model_cfg) -> Any:
    """The whole parameter tree of `init.checkpoint` (a model checkpoint or a training workdir),
    which must hold this run's architecture and config."""
    source = CheckpointParams.open(config.init.checkpoint)
    want = type(model).__name__
    if source.architecture != want:
        raise ValueError(f"init.checkpoint {source.source} holds a {source.architecture}; {config.stage} trains a "
                         f"{want}")
    diffs = config_differences(model_cfg, source.config)
    if diffs:
        raise ValueError(f"init.checkpoint {source.source} does not match config.model (ours vs checkpoint):\n  "
                         + "\n  ".join(diffs))
    return source.tree()


class _Preemption:
    """Turns SIGTERM into a flag the loop checks after every step (all processes agree)."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):  # noqa: ARG002
        self.requested = True

    def agreed(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        return bool(np.any(multihost_utils.process_allgather(np.array(self.requested))))


def train(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, float]:
    """Run (or resume) the training described by `config` in `workdir`; returns the last metrics."""
    dist = config.distributed
    initialize(dist.coordinator_address, dist.num_processes, dist.process_id)
    workdir = Path(workdir)
    is_main = jax.process_index() == 0
    devices = jax.devices() if config.mesh.num_devices == -1 else jax.devices()[: config.mesh.num_devices]
    mesh = mesh_lib.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices)
    model, model_cfg, loss_fn = build_objective(config)
    patterns = patterns_for(config.trainable)

    boxed = blip2.abstract_params(model_cfg, unbox=False, model=model)
    trainable_sh, frozen_sh = partition(mesh_lib.logical_shardings(boxed, mesh), patterns)
    trainable_abstract, _ = partition(nn.unbox(boxed), patterns)
    schedule = learning_rate_schedule(config.optim)
    tx = make_optimizer(config.optim, trainable_abstract)

    def create_state(trainable, rng):
        return TrainState.create(trainable, tx, rng)

    key = jax.random.PRNGKey(config.seed + 1)
    state_shardings = jax.jit(create_state, in_shardings=(trainable_sh, None)).lower(
        trainable_abstract, key).compile().output_shardings
    state_abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                  jax.eval_shape(create_state, trainable_abstract, key), state_shardings)

    ckpt = Checkpointer(workdir, save_every=config.checkpoint.every, keep=config.checkpoint.keep,
                        async_save=config.checkpoint.async_save)
    frozen_dtype = jnp.dtype(config.frozen_dtype)
    metadata = {"config": config.to_json(), "frozen_source": config.init.hf or config.init.checkpoint or f"seed {config.seed}",
                "frozen_dtype": str(frozen_dtype)}
    if ckpt.latest_step() is not None:
        _, frozen_abstract = partition(nn.unbox(boxed), patterns)
        frozen_abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, frozen_dtype, sharding=sh),
                                       frozen_abstract, frozen_sh)
        frozen = ckpt.restore_frozen(frozen_abstract)
        state, data_state, _ = ckpt.restore(state_abstract)
        logging.info("resumed from %s at step %d", ckpt.workdir, int(state.step))
    else:
        trainable, frozen = _initial_params(config, model, model_cfg, patterns, (trainable_sh, frozen_sh))
        frozen = jax.tree.map(lambda x: x.astype(frozen_dtype), frozen)
        state = jax.jit(create_state, out_shardings=state_shardings)(trainable, key)
        ckpt.save_frozen(frozen)
        data_state = {"next_step": 0}

    loader = make_loader(config, model_cfg, data_kind(config, model_cfg))
    if data_state.get("next_step", 0):
        loader.set_state(data_state)
    start = int(state.step)
    if start != loader.get_state()["next_step"]:
        raise RuntimeError(f"checkpoint step {start} and data position {loader.get_state()['next_step']} disagree")
    first = loader.next()
    batch_sh = {k: mesh_lib.batch_sharding(mesh, v.ndim) for k, v in first.items()}
    step_fn = jax.jit(functools.partial(train_step, loss_fn=loss_fn, tx=tx, schedule=schedule),
                      in_shardings=(state_shardings, frozen_sh, batch_sh),
                      out_shardings=(state_shardings, mesh_lib.replicated(mesh)), donate_argnums=(0,))

    def global_batch(host: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return {k: jax.make_array_from_process_local_data(batch_sh[k], v, (config.batch_size, *v.shape[1:]))
                for k, v in host.items()}

    writer = metrics_lib.MetricWriter(workdir, enabled=is_main, tensorboard=config.log.tensorboard,
                                      resume_step=start)
    flops = step_flops(step_fn, state, frozen, global_batch(first))
    preemption = _Preemption()
    last: dict[str, float] = {}
    tick, since = time.perf_counter(), 0
    for step in range(start, config.total_steps):
        batch = global_batch(first if step == start else loader.next())
        state, metrics = step_fn(state, frozen, batch)
        done, since = step + 1, since + 1
        if done % config.log.every == 0 or done == config.total_steps:
            metrics = jax.device_get(metrics)  # waits for the step: the timing below is real
            step_time = (time.perf_counter() - tick) / since
            skipped = loader.stats.get("skipped")
            extra = {} if skipped is None else {"data_skipped": float(skipped)}
            last = writer.write(done, {**metrics, **extra}, step_time=step_time, batch_size=config.batch_size,
                                tokens=int(batch_tokens(batch)), flops=flops, num_devices=mesh.size,
                                peak_flops=config.log.peak_flops_per_device)
            tick, since = time.perf_counter(), 0
        preempted = preemption.agreed()
        ckpt.save(done, state, loader.get_state(), metadata, force=preempted or done == config.total_steps)
        if preempted:
            logging.warning("SIGTERM: saved a checkpoint at step %d; exiting", done)
            break
    ckpt.wait()
    ckpt.close()
    writer.close()
    return last


def batch_tokens(batch: dict[str, jax.Array]) -> jax.Array:
    """Real text tokens in a batch (for tokens/s)."""
    return sum(jnp.sum(v) for k, v in batch.items() if k.endswith("_mask"))
