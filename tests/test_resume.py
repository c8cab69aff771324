"""Killed, preempted and multi-process runs (issue "training" Done-when 4 and 5), through the real
command in subprocesses: a run killed with SIGKILL at a random step and restarted continues the
exact loss curve and ends with the same parameters; SIGTERM saves a checkpoint before exiting; two
processes with 4 CPU devices each (started by launch/local.sh) train what one process with 8
devices trains."""
import json
import os
import pathlib
import random
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from blip2_jax.checkpoint import Checkpointer

pytestmark = pytest.mark.slow
ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 8


def command(workdir, *extra):
    return [sys.executable, "-m", "blip2_jax", "train", "--config", str(ROOT / "configs/stage2_opt.py:tiny"),
            "--workdir", str(workdir), f"--config.total_steps={STEPS}", "--config.checkpoint.every=2",
            "--config.log.every=1", "--config.log.tensorboard=False", *extra]


def env(devices: int) -> dict:
    e = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def metrics(workdir) -> list[dict]:
    path = pathlib.Path(workdir) / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def final_params(workdir):
    ckpt = Checkpointer(workdir, save_every=1)
    step = ckpt.latest_step()
    params = jax.device_get(ckpt.restore_arrays(step)["params"])
    ckpt.close()
    return step, params


def run_to_end(workdir, devices=1, *extra):
    subprocess.run(command(workdir, *extra), env=env(devices), check=True, capture_output=True, timeout=600)


def start_and_signal(workdir, sig, after_steps: int) -> subprocess.Popen:
    proc = subprocess.Popen(command(workdir), env=env(1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while len(metrics(workdir)) < after_steps:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=300)
    return proc


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    run_to_end(workdir)
    return workdir


def test_sigkill_then_restart_continues_exactly(uninterrupted, tmp_path):
    kill_after = random.Random(os.getpid()).randint(2, STEPS - 2)  # a random step
    proc = start_and_signal(tmp_path, signal.SIGKILL, kill_after)
    assert proc.returncode == -signal.SIGKILL
    killed_at = len(metrics(tmp_path))
    assert killed_at < STEPS, "the run finished before it was killed; nothing was tested"
    run_to_end(tmp_path)
    resumed, reference = metrics(tmp_path), metrics(uninterrupted)
    assert [m["step"] for m in resumed] == list(range(1, STEPS + 1))
    assert [m["loss"] for m in resumed] == [m["loss"] for m in reference]  # exactly
    (step_a, a), (step_b, b) = final_params(tmp_path), final_params(uninterrupted)
    assert step_a == step_b == STEPS
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_sigterm_saves_a_checkpoint_before_exiting(tmp_path):
    proc = start_and_signal(tmp_path, signal.SIGTERM, 3)
    assert proc.returncode == 0, proc.stderr.read().decode()[-3000:]
    logged = metrics(tmp_path)[-1]["step"]
    step, _ = final_params(tmp_path)
    assert step == logged < STEPS  # saved at the step it stopped at, not the last periodic save


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_what_one_process_trains(tmp_path):
    single = tmp_path / "single"
    run_to_end(single, 8)
    multi = tmp_path / "multi"
    # through the launcher users run (launch/local.sh): 2 processes x 4 simulated devices
    train = command(multi)
    launcher = [str(ROOT / "launch/local.sh"), "-n", "2", "-d", "4", "-p", str(_free_port()), "--", *train[3:]]
    launched = subprocess.run(launcher, env=dict(env(1), BLIP2_JAX=f"{sys.executable} -m blip2_jax",
                                                  LOG_DIR=str(tmp_path / "logs")), capture_output=True, timeout=900)
    logs = "".join(p.read_text()[-2000:] for p in sorted((tmp_path / "logs").glob("process_*.log")))
    assert launched.returncode == 0, launched.stderr.decode() + logs
    assert len(list((tmp_path / "logs").glob("process_*.log"))) == 2
    a, b = metrics(single), metrics(multi)
    assert len(a) == len(b) == STEPS
    np.testing.assert_allclose([m["loss"] for m in b], [m["loss"] for m in a], rtol=0, atol=1e-5)
