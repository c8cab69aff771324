"""Step metrics to the console, `workdir/metrics.jsonl` and TensorBoard (process 0 only).

Throughput is images/s and text tokens/s over the logging window; MFU divides the FLOPs XLA
counts for the compiled step (the frozen towers' forward and the activation gradients that pass
through them, no weight gradients for them) by the devices' peak.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
from absl import logging

# bf16 dense peak FLOP/s per device, by `device_kind` prefix (public spec sheets).
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6": 918e12,
              "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12}


def peak_flops_per_device(override: float | None = None) -> float | None:
    if override:
        return float(override)
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_FLOPS.items() if kind.startswith(k)), None)


def step_flops(step_fn, *args) -> float | None:
    """FLOPs one device executes in one compiled (SPMD-partitioned) step; None where XLA does not say."""
    try:
        analysis = step_fn.lower(*args).compile().cost_analysis()
    except Exception as e:  # pylint: disable=broad-except  # some backends lack cost analysis
        logging.warning("no cost analysis for the train step: %s", e)
        return None
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    flops = (analysis or {}).get("flops")
    return None if flops is None else float(flops)


class MetricWriter:
    """Writes one line per logged step; on resume drops lines past the resumed step."""

    def __init__(self, workdir: Path, *, enabled: bool, tensorboard: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if self.path.exists():  # a killed run may have logged steps after its last checkpoint
            kept = [line for line in self.path.read_text().splitlines()
                    if line and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel

                self.tb = SummaryWriter(str(Path(workdir) / "tensorboard"))
            except ImportError:
                logging.warning("tensorboardX is not installed: no TensorBoard logs")

    def write(self, step: int, metrics: dict[str, Any], *, step_time: float, batch_size: int, tokens: int,
              flops: float | None, peak_flops: float | None) -> dict[str, float]:
        out = {k: float(v) for k, v in metrics.items()}
        out.update(step_time=step_time, images_per_s=batch_size / step_time, tokens_per_s=tokens / step_time)
        peak = peak_flops_per_device(peak_flops)
        if flops is not None and peak:
            out["mfu"] = flops / step_time / peak
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, **out}) + "\n")
            print(f"step {step} | " + " ".join(f"{k}={v:.4g}" for k, v in sorted(out.items())), flush=True)
            if self.tb is not None:
                for k, v in out.items():
                    self.tb.add_scalar(k, v, step)
        return out

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
