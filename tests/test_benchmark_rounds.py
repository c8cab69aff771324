"""`benchmarks/train_step.py --rounds R`: the parent runs the torch and jax children in turn R
times and pools their timed steps. The children are replaced by fakes whose step times are known,
so the printed medians can be checked by hand; `--rounds 0` is refused before anything runs."""
import importlib.util
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # train_step.py imports its sibling `common`
    try:
        spec = importlib.util.spec_from_file_location("bench_train_step", ROOT / "benchmarks" / "train_step.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


def _result(times: list[float], load: float) -> dict:
    """A child's result line with the given step times (CPU time twice the wall time)."""
    return dict(device="cpu: fake", times=times, cpu_times=[2 * t for t in times], load=load, peak_mib=100.0,
                step_peak_mib=90.0, xla_argument_mib=1.0, xla_temp_mib=2.0, trainable=1e6, frozen=2e6,
                eval_loss=1.0, first_loss=2.0, last_loss=1.5, compile_s=3.0, wall_s=4.0, flops=8e9,
                xla_flops=1e9, matmul_gflops=4.0, kernel_s=1.0)


def test_rounds_pool_every_steps_of_both_children(bench, monkeypatch, capsys):
    """torch rounds [6, 7] and [5, 4] pool to median 5.5; jax rounds [5, 3] and [4, 2] to 3.5:
    1.57x, where either round alone gives 1.63x or 1.50x. Round medians print beside; only the
    first jax child measures the floors; the load is the worst round's."""
    results = {"torch": [_result([6.0, 7.0], 1.0), _result([5.0, 4.0], 1.5)],
               "jax": [_result([5.0, 3.0], 1.2), _result([4.0, 2.0], 0.9)]}
    calls = []

    def fake_child(framework, args, weights="", floors=True):
        calls.append((framework, floors))
        return results[framework][sum(f == framework for f, _ in calls) - 1]

    monkeypatch.setattr(bench, "_child", fake_child)
    monkeypatch.setattr(bench, "save_weights", lambda directory: None)
    monkeypatch.setattr(sys, "argv", ["train_step.py", "--rounds", "2", "--steps", "2"])
    bench.main()
    out = capsys.readouterr().out
    assert calls == [("torch", True), ("jax", True), ("torch", True), ("jax", False)]
    assert bench.row("step time, median (s)", "3.500", "5.500", "1.57x") in out
    assert bench.row("step time, min-max (s)", "2.000-5.000", "4.000-7.000") in out
    assert bench.row("  median of each round (s)", "4.00 3.00", "6.50 4.50") in out
    assert bench.row("step CPU time, median (s)", "7.000", "11.000", "1.57x") in out
    assert bench.row("1-min load average after steps", "1.20", "1.50") in out
    assert "in each of 2 rounds of the two children in turn, pooled" in out


@pytest.mark.parametrize("flag", ["--rounds", "--steps"])
def test_fewer_than_one_round_or_step_is_refused_in_one_line(flag):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_step.py"), flag, "0"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--rounds and --steps must be >= 1" in proc.stderr and f"{flag} 0" in proc.stderr
