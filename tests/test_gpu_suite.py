"""`bash benchmarks/gpu_suite.sh --tiny`: the GPU suite's own code, run at tiny sizes on the CPU so
that it cannot rot before a GPU is lent. Its numbers are checked against what must hold on any device."""
import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


# What a lent GPU machine lacks (the device notes): the suite must not import them.
ABSENT_ON_GPU_MACHINE = ("grain", "array_record", "tensorboardX", "easy_vqa")


@pytest.mark.slow
def test_gpu_suite_tiny(tmp_path):
    blocked = tmp_path / "absent"
    for name in ABSENT_ON_GPU_MACHINE:
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is not on the GPU machine')\n")
    env = {**os.environ, "PYTHONPATH": str(blocked)}
    proc = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "--tiny", "--steps", "2", "--runs", "1",
                           "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=900,
                          check=False, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = {r["part"]: r for r in json.loads((tmp_path / "gpu_suite.json").read_text())["results"]}
    assert set(results) == {"stage1", "stage2", "caption"}
    for part in ("stage1", "stage2"):
        r = results[part]
        assert r["device"].startswith("cpu") and r["finite"]
        # The batch is the largest candidate whose predicted peak fits: on the CPU (no limit), the first.
        assert r["batch"] == r["tried"][0]["batch"] == 16
        # Remat recomputes forward matmuls, so hardware FLOPs exceed model FLOPs exactly when it is on.
        assert (r["hardware_flops"] > r["model_flops"]) == (r["remat"] != "none")
        assert r["hardware_flops"] >= r["model_flops"] > 0
        assert 0 < r["argument_bytes"] <= r["predicted_peak_bytes"]
    caption = results["caption"]
    # The same random weights in both frameworks compute the same function in fp32; the bf16 beams
    # may part where two continuations tie within bf16's rounding, but not for most captions.
    assert caption["ours_fp32_vs_torch_fp32"] < 1e-5
    assert 2 * caption["same_ids"] >= caption["batch"]
    # bf16 (8 mantissa bits) lands near 2^-8 relative error in both, far from fp32's.
    for name in ("ours_bf16_vs_fp32", "torch_bf16_vs_fp32"):
        assert 1e-4 < caption[name] < 5e-2
    assert "== summary ==" in proc.stdout and "FAILED" not in proc.stdout
