"""The training progress bar: step, images/s and time left, as `blip2-jax eval` shows its own.

Only process 0 shows it, and only on an interactive terminal (or a `file` given to it): in a log
file a redrawn bar is noise, and the step lines (`train/metrics.py`) already say everything. The
metric lines go through the bar's `write`, so they scroll above it instead of tearing it.
"""
from __future__ import annotations

import sys
from typing import IO

from tqdm import tqdm

BAR_FORMAT = "{desc} {n_fmt}/{total_fmt} |{bar}| {percentage:3.0f}% [{elapsed}<{remaining}{postfix}]"


class Progress:
    """A bar over the run's steps that starts at the resumed step, so its rate and time left count
    only the steps this process ran."""

    def __init__(self, total_steps: int, start_step: int, *, enabled: bool, file: IO[str] | None = None):
        file = sys.stderr if file is None else file
        show = enabled and (file is not sys.stderr or file.isatty())
        self._bar = tqdm(total=total_steps, initial=start_step, desc="step", file=file, disable=not show,
                         bar_format=BAR_FORMAT, dynamic_ncols=True, smoothing=0.05)

    def step(self) -> None:
        self._bar.update(1)

    def show(self, metrics: dict[str, float]) -> None:
        """The newest logged throughput and loss, beside the time left."""
        self._bar.set_postfix_str(f"{metrics['images_per_s']:.1f} images/s, loss {metrics['loss']:.4g}"
                                  if "loss" in metrics else f"{metrics['images_per_s']:.1f} images/s")

    def write(self, line: str) -> None:
        """A line to stdout, above the bar (tqdm clears a bar on stderr for it and redraws it)."""
        if self._bar.disable:
            print(line, flush=True)
        else:
            self._bar.write(line, file=sys.stdout)
            sys.stdout.flush()

    def close(self) -> None:
        self._bar.close()
