"""Step metrics to the console, `workdir/metrics.jsonl`, TensorBoard and, when asked, Weights &
Biases (process 0 only).

Throughput is images/s and text tokens/s over the logging window; MFU divides the step's matrix
FLOPs (`train/flops.py`: the frozen towers' forward and the activation gradients that pass
through them, no weight gradients for them) by the peak of all devices.
"""
from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, Callable

import jax
from absl import logging

from blip2_jax.errors import UserError

# bf16 dense peak FLOP/s per device, by `device_kind` prefix (public spec sheets).
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6": 918e12,
              "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12}


def peak_flops_per_device(override: float | None = None) -> float | None:
    if override:
        return float(override)
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_FLOPS.items() if kind.startswith(k)), None)


def _print(line: str) -> None:
    print(line, flush=True)


def wandb_run(workdir: Path, project: str, config: dict[str, Any]) -> Any:
    """A W&B run named after the workdir, started before the model is built so that a login problem
    costs seconds; its id is kept in the workdir, so a resumed training
    continues the same W&B run (W&B drops the steps a killed run logged past its checkpoint, since
    its steps only increase). WANDB_MODE=offline keeps it on disk under `workdir/wandb`."""
    import wandb  # pylint: disable=import-outside-toplevel

    id_file = workdir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    try:
        return wandb.init(project=project, name=workdir.name, id=run_id, resume="allow", dir=str(workdir),
                          config=config)
    except wandb.errors.UsageError as e:  # no API key, a bad project or entity name
        raise UserError(f"config.log.wandb=True: W&B could not start a run in project {project!r}: {e} "
                        "(or WANDB_MODE=offline)") from e


class MetricWriter:
    """Writes one line per logged step; on resume drops lines past the resumed step. `echo` shows
    the line (the progress bar's `write`); `wandb` is a run from `wandb_run` (finished on close), or None."""

    def __init__(self, workdir: Path, *, enabled: bool, tensorboard: bool, resume_step: int = 0,
                 echo: Callable[[str], None] = _print, wandb: Any = None):
        self.enabled, self.echo, self.wandb = enabled, echo, wandb
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
              flops: float, num_devices: int, peak_flops: float | None) -> dict[str, float]:
        out = {k: float(v) for k, v in metrics.items()}
        out.update(step_time=step_time, images_per_s=batch_size / step_time, tokens_per_s=tokens / step_time)
        peak = peak_flops_per_device(peak_flops)
        if peak:
            out["mfu"] = flops / step_time / (peak * num_devices)
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, **out}) + "\n")
            self.echo(f"step {step} | " + " ".join(f"{k}={v:.4g}" for k, v in sorted(out.items())))
            if self.tb is not None:
                for k, v in out.items():
                    self.tb.add_scalar(k, v, step)
            if self.wandb is not None:
                self.wandb.log(out, step=step)
        return out

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
