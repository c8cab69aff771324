"""`log.profile_steps=A,B`: a `jax.profiler` trace of training steps A..B (1-based, as logged).

The first steps compile and the first logged window is warm-up, so a trace of the whole run shows
mostly that; naming the steps gives a trace of the steady state that TensorBoard's Profile tab
(`tensorboard --logdir <workdir>/profile`) or ui.perfetto.dev (the `.trace.json.gz`) opens. Process
0 traces its own host; the trace stops after step B has finished on the devices, not when it was
dispatched, so B's kernels are in it.
"""
from __future__ import annotations

from pathlib import Path

import jax
from absl import logging

from blip2_jax.errors import UserError


def parse_steps(value: str, total_steps: int) -> tuple[int, int] | None:
    """'A,B' -> (A, B), checked against the run; '' -> None (no trace)."""
    if not value:
        return None
    parts = str(value).split(",")
    try:
        first, last = (int(p) for p in parts) if len(parts) == 2 else (0, -1)
    except ValueError:
        first, last = 0, -1
    if not 1 <= first <= last <= total_steps:
        raise UserError(f"config.log.profile_steps must be 'A,B' with 1 <= A <= B <= total_steps ({total_steps}), "
                        f"got {value!r}")
    return first, last


class StepProfiler:
    """Starts the trace before step `first` runs and stops it once step `last` is done."""

    def __init__(self, steps: tuple[int, int] | None, out: Path, *, start_step: int, enabled: bool):
        self._steps, self._out, self._active = steps if enabled else None, out, False
        if self._steps and start_step >= self._steps[0]:
            logging.warning("log.profile_steps=%d,%d: the run resumes after step %d, so nothing is traced",
                            *self._steps, start_step)
            self._steps = None

    def before(self, step: int) -> None:
        """Called before the 1-based step `step` is dispatched."""
        if self._steps and step == self._steps[0]:
            jax.profiler.start_trace(str(self._out), create_perfetto_trace=True)
            self._active = True

    def after(self, step: int, result) -> None:
        """Called after step `step` was dispatched; `result` is what it returned (waited for)."""
        if self._active and step == self._steps[1]:
            jax.block_until_ready(result)
            self.close()
            logging.info("trace of steps %d-%d written to %s", *self._steps, self._out)

    def close(self) -> None:
        """Stops a trace still running (a run that ended or failed inside the window)."""
        if self._active:
            self._active = False
            jax.profiler.stop_trace()
