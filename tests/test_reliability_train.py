"""A run never trains on NaN, never loses a good checkpoint, never loads the wrong frozen weights
(issue 18): each test reproduces one fault on the tiny stage-1 preset and checks what the trainer
does. The runs share one compiled step through JAX's persistent compilation cache: they differ
only in what happens around the step (workdir contents, a failing loader, flags)."""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from blip2_jax.checkpoint import CheckpointError, Checkpointer, abstract_like
from blip2_jax.parallel import mesh as mesh_lib
from blip2_jax.train import loop
from blip2_jax.train.layout import build_layout
from blip2_jax.train.lock import WorkdirBusy, WorkdirLock
from blip2_jax.train.resume import frozen_fingerprint
from blip2_jax.train.state import TrainState
from blip2_jax.train.step import train_step
from tests.test_train import ROOT, load_config

STEPS = 3


def tiny_config():
    """The healthy run: tiny stage 1, STEPS steps on one device, a checkpoint every step (keep 3)."""
    config = load_config("configs/stage1.py", "tiny")
    config.total_steps, config.optim.warmup_steps = STEPS, 1
    config.mesh.update(num_devices=1, data=1)
    config.checkpoint.update(every=1, keep=3, async_save=False)
    config.log.tensorboard = False
    return config


def steps_in(workdir) -> list[int]:
    ckpt = Checkpointer(workdir, save_every=1)
    steps = ckpt.steps()
    ckpt.close()
    return steps


def saved_params(workdir, step):
    ckpt = Checkpointer(workdir, save_every=1)
    params = jax.device_get(ckpt.restore_arrays(step)["params"])
    ckpt.close()
    return params


def losses(workdir) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    """A finished healthy run (checkpoints 1..3), trained once; tests work on copies of it."""
    workdir = tmp_path_factory.mktemp("healthy")
    loop.train(tiny_config(), workdir)
    return workdir


def copy_of(healthy, tmp_path) -> pathlib.Path:
    workdir = tmp_path / "run"
    shutil.copytree(healthy, workdir, ignore=shutil.ignore_patterns("lock"))
    return workdir


def test_a_nonfinite_step_is_not_applied():
    params = {"w": jnp.arange(3.0)}
    tx = optax.adam(0.1)
    state = TrainState.create(params, tx, jax.random.PRNGKey(0))

    def loss_fn(p, batch, rng):  # noqa: ARG001
        loss = jnp.sum(p["w"] * batch["x"])
        return loss, {"loss": loss}

    step = jax.jit(lambda s, b: train_step(s, {}, b, loss_fn=loss_fn, tx=tx))
    bad, metrics = step(state, {"x": jnp.array([1.0, jnp.nan, 1.0])})
    assert int(metrics["nonfinite"]) == 1 and int(bad.step) == 1  # the batch is consumed...
    for a, b in zip(jax.tree.leaves((state.params, state.opt_state)), jax.tree.leaves((bad.params, bad.opt_state))):
        np.testing.assert_array_equal(a, b)  # ...but nothing it touched changes, Adam's count included
    good, metrics = step(bad, {"x": jnp.ones(3)})
    assert int(metrics["nonfinite"]) == 0
    # Adam's first step is lr * sign(g); float32 rounds its bias correction 1 - 0.999 at ~1e-5
    np.testing.assert_allclose(good.params["w"], np.arange(3.0) - 0.1, rtol=1e-5)


@pytest.mark.slow
def test_a_diverging_continuation_keeps_the_good_checkpoints_and_exits_nonzero(healthy, tmp_path):
    """The reported case: a finished run continued with lr=1e30 rotated out every good checkpoint."""
    workdir = copy_of(healthy, tmp_path)
    good = {s: saved_params(workdir, s) for s in (2, 3)}
    flags = ["--config.total_steps=10", "--config.optim.warmup_steps=1", "--config.optim.lr=1e30",
             "--config.mesh.num_devices=1", "--config.mesh.data=1", "--config.checkpoint.every=1",
             "--config.checkpoint.async_save=False", "--config.log.tensorboard=False",
             "--config.nonfinite.max_consecutive=3"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), XLA_FLAGS="")
    proc = subprocess.run([sys.executable, "-m", "blip2_jax", "train", "--config", str(ROOT / "configs/stage1.py:tiny"),
                           "--workdir", str(workdir), *flags], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0
    assert "not finite for 3 steps in a row (steps 5-7" in proc.stderr, proc.stderr[-3000:]
    # step 4 still had a finite loss (its update made the parameters huge); 5, 6, 7 were skipped
    assert steps_in(workdir) == [2, 3, 4]
    for step, params in good.items():
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(saved_params(workdir, step))):
            np.testing.assert_array_equal(a, b)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved_params(workdir, 4)))
    logged = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [m["nonfinite_steps"] for m in logged[STEPS:]] == [0, 1, 2, 3]


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_step(healthy, tmp_path, damage, caplog):
    workdir = copy_of(healthy, tmp_path)
    for f in (workdir / "checkpoints/3/state").rglob("*"):
        if damage == "truncated" and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[:10])
        elif damage == "missing" and f.name == "manifest.ocdbt":
            f.unlink()
    loop.train(tiny_config(), workdir)
    assert "skipped checkpoint step 3" in caplog.text
    assert [p.name.split("-")[0] for p in (workdir / "checkpoints_unreadable").iterdir()] == ["3"]
    assert steps_in(workdir) == [1, 2, 3]
    assert losses(workdir)[3] == losses(healthy)[3]  # resumed exactly from step 2
    for a, b in zip(jax.tree.leaves(saved_params(healthy, 3)), jax.tree.leaves(saved_params(workdir, 3))):
        np.testing.assert_array_equal(a, b)


class Failing:
    """The real loader, raising on the call that would fetch batch `fail_at` (0-based)."""

    def __init__(self, loader, fail_at: int):
        self.loader, self.fail_at, self.calls = loader, fail_at, 0

    def next(self):
        if self.calls == self.fail_at:
            raise OSError("injected: the data disappeared")
        self.calls += 1
        return self.loader.next()

    def __getattr__(self, name):
        return getattr(self.loader, name)


def read_frozen(workdir, config):
    """A run's frozen towers, restored onto one device with the checks a resume makes."""
    mesh = mesh_lib.make_mesh(1, 1, 1, jax.devices()[:1])
    ckpt = Checkpointer(workdir, save_every=1)
    frozen = ckpt.restore_frozen(build_layout(config, mesh).frozen_abstract, frozen_fingerprint(config))
    ckpt.close()
    return jax.device_get(frozen)


@pytest.mark.slow
def test_an_exception_in_the_loop_completes_the_save_and_replaces_a_stale_frozen_dir(healthy, tmp_path, monkeypatch):
    """A first attempt that died after writing `frozen/` (here: from other weights) must not lend
    its towers to the rerun; and an exception mid-run leaves no half-written step behind."""
    workdir = tmp_path / "run"
    config, other = tiny_config(), tiny_config()
    other.seed = 7
    ckpt = Checkpointer(workdir, save_every=1)
    ckpt.save_frozen(jax.tree.map(np.zeros_like, read_frozen(healthy, config)), frozen_fingerprint(other))
    ckpt.close()
    config.checkpoint.async_save = True
    make_loader = loop.make_loader
    monkeypatch.setattr(loop, "make_loader", lambda *a, **k: Failing(make_loader(*a, **k), fail_at=STEPS - 1))
    with pytest.raises(OSError, match="injected"):
        loop.train(config, workdir)
    assert not list((workdir / "checkpoints").glob("*.orbax-checkpoint-tmp*"))
    assert steps_in(workdir) == [1, 2]
    for a, b in zip(jax.tree.leaves(read_frozen(healthy, config)), jax.tree.leaves(read_frozen(workdir, config))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_frozen_towers_from_other_weights_are_refused_on_resume(healthy, tmp_path):
    workdir = copy_of(healthy, tmp_path)
    stored = json.loads((workdir / "frozen/fingerprint.json").read_text())
    (workdir / "frozen/fingerprint.json").write_text(json.dumps(dict(stored, seed=5, init_hf="Salesforce/x")))
    with pytest.raises(CheckpointError, match=r"init_hf: 'Salesforce/x' -> ''; seed: 5 -> 0"):
        loop.train(tiny_config(), workdir)


@pytest.mark.slow
def test_a_resume_refuses_a_changed_model_or_batch_stream_naming_the_fields(healthy, tmp_path):
    workdir = copy_of(healthy, tmp_path)
    config = tiny_config()
    config.batch_size, config.seed, config.data.text_length = 4, 1, 16  # refused
    config.log.every, config.total_steps, config.checkpoint.keep = 2, 5, 4  # allowed
    with pytest.raises(ValueError) as error:
        loop.train(config, workdir)
    message = str(error.value)
    assert "batch_size: 8 -> 4" in message and "seed: 0 -> 1" in message and "data.text_length: 12 -> 16" in message
    assert not any(f in message for f in ("log.every", "total_steps", "checkpoint.keep"))
    assert steps_in(workdir) == [1, 2, 3] and not (workdir / "checkpoints_unreadable").exists()  # not "damaged"


def test_a_second_run_in_a_busy_workdir_is_refused_and_a_dead_owners_lock_is_taken_over(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from blip2_jax.train.lock import WorkdirLock; "
         "WorkdirLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)", str(tmp_path)],
        env=dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu"), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkdirBusy, match=f"in use by process {holder.pid}"):
            loop.train(tiny_config(), tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / "lock").read_text().strip() == str(holder.pid)  # the dead owner's file is still there
    WorkdirLock(tmp_path).acquire().release()  # and is taken over


def test_checkpointer_skips_unreadable_steps_and_refuses_when_none_is_readable(tmp_path):
    ckpt = Checkpointer(tmp_path, save_every=1, async_save=False)
    for step in (1, 2):
        ckpt.save(step, {"w": jnp.full(4, float(step))}, {"next_step": step}, {"config": "{}"})
    ckpt.close()
    for f in (tmp_path / "checkpoints").rglob("manifest.ocdbt"):
        f.unlink()
    ckpt = Checkpointer(tmp_path, save_every=1)
    with pytest.raises(CheckpointError, match=r"no readable checkpoint .*step 2: .*step 1: "):
        ckpt.restore_newest_readable(abstract_like({"w": jnp.zeros(4)}), lambda metadata: None)
    ckpt.close()


def test_frozen_towers_are_replaced_when_they_come_from_other_weights_and_checked_on_restore(tmp_path):
    towers = {"w": jnp.arange(4.0)}
    abstract = abstract_like(towers)
    ckpt = Checkpointer(tmp_path, save_every=1)
    ckpt.save_frozen(jax.tree.map(jnp.zeros_like, towers), {"seed": 1})  # an earlier attempt's
    ckpt.save_frozen(towers, {"seed": 0})
    np.testing.assert_array_equal(ckpt.restore_frozen(abstract, {"seed": 0})["w"], towers["w"])
    with pytest.raises(CheckpointError, match="seed: 0 -> 1"):
        ckpt.restore_frozen(abstract, {"seed": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "frozen"]  # no temporary left
    ckpt.close()
