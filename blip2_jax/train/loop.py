"""The trainer: mesh -> layout -> restore or init -> loader -> step -> loop.

A checkpoint in `workdir` is resumed (design, style habit 8); a fresh run takes its weights from
`train/init.py` (init.hf, init.checkpoint, BERT, random, then init.stage1, in that order).
A run that is killed resumes from its last complete checkpoint and continues the exact loss
curve; SIGTERM (preemption) saves a checkpoint before exiting. Only process 0 writes logs.

Reliability: a resume restores the newest readable checkpoint, refuses a config that changes the
model or the batch stream (`train/resume.py`) and frozen towers from other weights; a step with a
non-finite loss or gradient norm is skipped and counted (`nonfinite_steps`), never checkpointed, and
`nonfinite.max_consecutive` of them in a row stop the run with `TrainingDiverged`.
"""
from __future__ import annotations

import contextlib
import signal
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from blip2_jax.checkpoint import Checkpointer
from blip2_jax.data.loader import make_loader
from blip2_jax.errors import UserError
from blip2_jax.parallel import mesh as mesh_lib
from blip2_jax.parallel.distributed import initialize
from blip2_jax.train import metrics as metrics_lib
from blip2_jax.train.flops import step_flops
from blip2_jax.train.init import initial_params
from blip2_jax.train.layout import Layout, build_layout, data_args
from blip2_jax.train.lock import WorkdirLock
from blip2_jax.train.profiling import StepProfiler, parse_steps
from blip2_jax.train.progress import Progress
from blip2_jax.train.resume import frozen_fingerprint, refused_changes
from blip2_jax.train.validate import check_train_config


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


class TrainingDiverged(UserError):
    """The loss or gradient norm stayed non-finite for `nonfinite.max_consecutive` steps: a setting
    (usually the LR) or the data needs changing, so the CLI reports it as a user error."""


def train(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, float]:
    """Run (or resume) the training described by `config` in `workdir`; returns the last metrics.
    Process 0 holds the workdir's lock for the whole run (`train/lock.py`)."""
    if config.nonfinite.max_consecutive < 1:
        raise UserError(f"config.nonfinite.max_consecutive must be >= 1, got {config.nonfinite.max_consecutive}")
    dist = config.distributed
    initialize(dist.coordinator_address, dist.num_processes, dist.process_id)
    check_train_config(config, devices=jax.device_count(), processes=jax.process_count())
    devices = jax.devices() if config.mesh.num_devices == -1 else jax.devices()[: config.mesh.num_devices]
    mesh = mesh_lib.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices)
    layout = build_layout(config, mesh)  # shapes only: unmeetable mesh rules are refused before the workdir exists
    if layout.replicated:
        logging.warning("%d parameters are replicated where config.mesh.rules shard them (mesh %s does not divide "
                        "them); the largest: %s", len(layout.replicated), dict(mesh.shape),
                        layout.replicated[0].describe())
    workdir = Path(workdir)
    with contextlib.ExitStack() as on_exit:  # unwound on any exit, in reverse order
        if jax.process_index() == 0:
            on_exit.callback(WorkdirLock(workdir).acquire().release)
        ckpt = Checkpointer(workdir, save_every=config.checkpoint.every, keep=config.checkpoint.keep,
                            async_save=config.checkpoint.async_save, owner=True)
        on_exit.callback(ckpt.close)  # the save in flight completes, an unfinished one is removed
        return _train(layout, workdir, ckpt)


def _refuse_changed_config(workdir: Path, config: ml_collections.ConfigDict) -> Callable[[dict], None]:
    """The check a resume runs on a checkpoint's metadata before restoring it."""
    def check(metadata: dict) -> None:
        refused = refused_changes(metadata["config"], config)
        if refused:
            raise UserError(f"workdir {workdir} holds a run with another model, data or batch; a resume cannot "
                             f"change (stored -> now): {'; '.join(refused)}. Use a new --workdir (with "
                             f"--config.init.checkpoint={workdir} to start from its weights)")
    return check


def _train(layout: Layout, workdir: Path, ckpt: Checkpointer) -> dict[str, float]:
    config, mesh = layout.config, layout.mesh
    is_main = jax.process_index() == 0
    wandb = (metrics_lib.wandb_run(workdir, config.log.wandb_project, config.to_dict())
             if is_main and config.log.wandb else None)
    model, model_cfg = layout.model, layout.model_cfg

    frozen_dtype = jnp.dtype(config.frozen_dtype)
    fingerprint = frozen_fingerprint(config)
    metadata = {"config": config.to_json(), "frozen_dtype": str(frozen_dtype),
                "frozen_source": config.init.hf or config.init.checkpoint or f"seed {config.seed}"}
    if ckpt.latest_step() is not None:
        state, data_state, stored = ckpt.restore_newest_readable(layout.state_abstract,
                                                                 _refuse_changed_config(workdir, config))
        frozen = ckpt.restore_frozen(layout.frozen_abstract, fingerprint)
        nonfinite_total = stored.get("nonfinite_steps", 0)
        logging.info("resumed from %s at step %d", ckpt.workdir, int(state.step))
    else:
        trainable, frozen = initial_params(config, model, model_cfg, layout.patterns,
                                           (layout.trainable_shardings, layout.frozen_shardings))
        state = jax.jit(layout.create_state, out_shardings=layout.state_shardings)(trainable)
        ckpt.save_frozen(frozen, fingerprint)
        data_state, nonfinite_total = {"next_step": 0}, 0

    loader = make_loader(config, **data_args(config, model_cfg))
    if data_state.get("next_step", 0):
        loader.set_state(data_state)
    start = int(state.step)
    if start != loader.get_state()["next_step"]:
        raise RuntimeError(f"checkpoint step {start} and data position {loader.get_state()['next_step']} disagree")
    first = loader.next()
    batch_sh = {k: v.sharding for k, v in layout.batch_abstract().items()}
    step_fn = layout.step_fn(batch_sh)

    def global_batch(host: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return {k: jax.make_array_from_process_local_data(batch_sh[k], v, (config.batch_size, *v.shape[1:]))
                for k, v in host.items()}

    progress = Progress(config.total_steps, start, enabled=is_main and config.log.progress)
    writer = metrics_lib.MetricWriter(workdir, enabled=is_main, tensorboard=config.log.tensorboard,
                                      resume_step=start, echo=progress.write, wandb=wandb)
    profiler = StepProfiler(parse_steps(config.log.profile_steps, config.total_steps), workdir / "profile",
                            start_step=start, enabled=is_main)
    with contextlib.ExitStack() as on_exit:  # unwound on any exit: a failed run's trace and logs are closed too
        on_exit.callback(writer.close)
        on_exit.callback(progress.close)
        on_exit.callback(profiler.close)
        flops = step_flops(step_fn, state, frozen, global_batch(first))
        preemption = _Preemption()
        last: dict[str, float] = {}
        tick, since, streak = time.perf_counter(), 0, 0
        batch, data_state = global_batch(first), loader.get_state()
        for step in range(start, config.total_steps):
            stepped = batch
            profiler.before(step + 1)
            state, metrics = step_fn(state, frozen, stepped)
            saved_data_state = data_state  # where a resume after this step reads on
            data_error = None
            if step + 1 < config.total_steps:  # the next batch is read and placed while the step runs
                try:
                    batch = global_batch(loader.next())
                    data_state = loader.get_state()
                except Exception as e:  # pylint: disable=broad-exception-caught  # raised once this step is saved
                    data_error = e
            profiler.after(step + 1, metrics)  # once the next batch is read, as in any other step
            done, since = step + 1, since + 1
            progress.step()
            # one scalar read per step (it waits for the step): a skipped update is known before any save
            streak = streak + 1 if int(metrics.pop("nonfinite")) else 0
            if streak:
                nonfinite_total += 1
                logging.warning("step %d: loss or gradient norm not finite; update skipped (%d in a row)", done, streak)
            if done % config.log.every == 0 or done == config.total_steps:
                metrics = jax.device_get(metrics)  # waits for the step: the timing below is real
                step_time = (time.perf_counter() - tick) / since
                skipped = loader.stats.get("skipped")
                extra = {"nonfinite_steps": float(nonfinite_total)}
                if skipped is not None:
                    extra["data_skipped"] = float(skipped)
                last = writer.write(done, {**metrics, **extra}, step_time=step_time, batch_size=config.batch_size,
                                    tokens=int(batch_tokens(stepped)), flops=flops, num_devices=mesh.size,
                                    peak_flops=config.log.peak_flops_per_device)
                progress.show(last)
                tick, since = time.perf_counter(), 0
            if streak >= config.nonfinite.max_consecutive:
                raise TrainingDiverged(
                    f"loss or gradient norm not finite for {streak} steps in a row (steps {done - streak + 1}-{done}, "
                    f"nonfinite.max_consecutive={config.nonfinite.max_consecutive}); their updates were skipped and "
                    f"not checkpointed, the last checkpoint is step {ckpt.latest_step()} in {workdir}; lower optim.lr "
                    "or check the data")
            preempted = preemption.agreed()
            if streak == 0:  # a state reached through skipped updates is never saved, so it rotates nothing out
                ckpt.save(done, state, saved_data_state, {**metadata, "nonfinite_steps": nonfinite_total},
                          force=preempted or done == config.total_steps)
            if preempted:
                logging.warning("SIGTERM at step %d; exiting with the checkpoint of step %s", done, ckpt.latest_step())
                break
            if data_error is not None:
                raise data_error
        return last


def batch_tokens(batch: dict[str, jax.Array]) -> jax.Array:
    """Real text tokens in a batch (for tokens/s)."""
    return sum(jnp.sum(v) for k, v in batch.items() if k.endswith("_mask"))
