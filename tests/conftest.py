"""Test-wide settings: float32 matmuls at full precision on CPU, 8 simulated CPU devices so
sharding tests run in the same process (they must be set before JAX initialises), and one
persistent XLA compilation cache for the whole session.

Why the cache: on a 2-core CPU most of the suite's time is XLA compiling the same tiny training
steps again — the trainer's stage-1 step takes 80-100 s to compile on an AVX2 EPYC, and several
tests (in-process, in the CLI's subprocesses, in both pytest-xdist workers) build it from the same
config. The directory is made once by the first process (the xdist controller, or pytest alone) and
inherited by the workers and every subprocess through the environment. A size limit turns on JAX's
file lock, so a worker never reads an entry the other is still writing; an unreadable entry (a
process killed mid-write) only makes JAX warn and compile again. Set JAX_COMPILATION_CACHE_DIR to
keep the cache across runs (its size limit is then 8 GiB unless JAX_COMPILATION_CACHE_MAX_SIZE is
set too), or to an empty string to switch it off.
"""
import os
import shutil
import signal
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()
_OWN_CACHE = None if "JAX_COMPILATION_CACHE_DIR" in os.environ else tempfile.mkdtemp(prefix="blip2_jax_tests_xla_")
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))

import jax  # noqa: E402
import pytest  # noqa: E402
from absl.testing import flagsaver  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_sessionfinish(session, exitstatus):  # noqa: ARG001
    """The process that made the cache removes it (the workers inherited its path, so own none)."""
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture
def blip2_jax(monkeypatch, capsys):
    """`blip2-jax ARGS...` as the console script runs it (`cli.run` on `sys.argv`), in this process
    -> (exit code, stdout, stderr)."""
    from blip2_jax import cli  # pylint: disable=import-outside-toplevel

    handler = signal.getsignal(signal.SIGTERM)
    # `plan` sets XLA_FLAGS to one simulated device per mesh position, read when JAX starts its backend:
    # start it now with this file's 8 (else a `plan --mesh data=3` left this worker on 3 devices for every
    # later test), and put the variable back afterwards
    jax.devices()
    monkeypatch.setenv("XLA_FLAGS", os.environ["XLA_FLAGS"])

    def call(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["blip2-jax", *args])  # config overrides are read from sys.argv
        with flagsaver.flagsaver():
            try:
                cli.run()
                code = 0
            except SystemExit as e:
                code = e.code or 0
        out = capsys.readouterr()
        return code, out.out, out.err

    yield call
    signal.set_wakeup_fd(-1)  # `train` arms a SIGTERM-at-start-up handler: give pytest its own back
    signal.signal(signal.SIGTERM, handler)


@pytest.fixture
def no_processor_files(monkeypatch):
    """`convert.hf_export.to_hf` without the processor files: for tests that feed token ids (the
    processor's files are tested in test_convert.py)."""
    from blip2_jax.convert import hf_export  # pylint: disable=import-outside-toplevel

    monkeypatch.setattr(hf_export, "_write_processor",
                        lambda directory, params, source: params.config.image_token_index)
