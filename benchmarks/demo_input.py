"""The demo's input pipeline: CPU per batch with Grain's read threads against the demo's settings.

    python benchmarks/demo_input.py             # ~1 min on 2 idle cores
    python benchmarks/demo_input.py --batches 120

What it measures: for each demo run (`lm`, `stage1`, `stage2`, `blip2_jax/demo/configs.py`), the
loader the trainer builds (`data.loader.make_loader`) reading `--batches` batches of 64 after a
warm-up of 56 batches (stage 1's epoch, so that `data.cache_images` reads from memory, as it does
for most of a run), three ways, all in this process:
  threads:  `data.read_threads=16`, no image cache (the defaults);
  inline:   `data.read_threads=0` (the trainer's thread reads while the step runs);
  demo:     `read_threads=0` and `data.cache_images=True` (what `blip2-jax demo` runs).
`CPU ms / batch` is this process's CPU time (all threads) per batch: what a 2-core machine loses
from the step's own threads. The tokenizer's remembered calls (`data.tokenizers.Memoized`) are on
in all three; `no memo` is the demo's processing of one record with the tokenizer's plain calls,
against the same with `Memoized` (per record, called directly, this thread's CPU).
Every variant reads the same batches (tests/test_train_data.py).
"""
from __future__ import annotations

import argparse
import datetime
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from common import cpu_name, load_average

VARIANTS = {"threads": dict(read_threads=16, cache_images=False), "inline": dict(read_threads=0, cache_images=False),
            "demo": dict(read_threads=0, cache_images=True)}


def cpu_ms_per_batch(config, batches: int, warmup: int) -> float:
    """This process's CPU milliseconds per batch of the configured loader, after `warmup` batches."""
    from blip2_jax.data.loader import make_loader  # pylint: disable=import-outside-toplevel
    from blip2_jax.models import presets  # pylint: disable=import-outside-toplevel
    from blip2_jax.train.layout import data_args  # pylint: disable=import-outside-toplevel

    loader = make_loader(config, **data_args(config, presets.from_config_dict(config.model)))
    for _ in range(warmup):
        loader.next()
    tick = time.process_time()
    for _ in range(batches):
        loader.next()
    return (time.process_time() - tick) / batches * 1e3


def per_record_ms(config, records: int = 640) -> tuple[float, float]:
    """(plain tokenizer calls, remembered calls): ms of this thread's CPU per record, the demo's
    processing called directly on the first `records` records (images from memory in both)."""
    from blip2_jax.data import loader as loader_lib  # pylint: disable=import-outside-toplevel
    from blip2_jax.data.sources import CachedImages  # pylint: disable=import-outside-toplevel
    from blip2_jax.models import presets  # pylint: disable=import-outside-toplevel
    from blip2_jax.train.layout import data_args  # pylint: disable=import-outside-toplevel

    d, args = config.data, data_args(config, presets.from_config_dict(config.model))
    source = CachedImages(loader_lib.make_sources(d))
    rows = [source[i] for i in range(records)]
    out = []
    for plain in (True, False):
        process = loader_lib.record_processor(d, args["kind"], args["spec"], args["image_size"])
        if plain:  # the cached property, filled with the tokenizer Memoized wraps
            process.__dict__["tokenizer"] = process.tokenizer.tokenizer
        rng = np.random.default_rng(0)
        for row in rows[:64]:  # warm: the memory holds the texts, as after a run's first batches
            process(row, rng)
        tick = time.process_time()
        for row in rows:
            process(row, rng)
        out.append((time.process_time() - tick) / records * 1e3)
    return out[0], out[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=60, help="timed batches per run and variant")
    args = parser.parse_args()
    from blip2_jax.demo import configs, tokenizers  # pylint: disable=import-outside-toplevel

    load_before = os.getloadavg()
    start = datetime.datetime.now().astimezone()
    results = {}
    with tempfile.TemporaryDirectory(prefix="blip2_demo_input_") as workdir:
        tokenizers.write_qformer_tokenizer(Path(workdir) / "tokenizers" / "qformer")
        tokenizers.write_language_tokenizer(Path(workdir) / "tokenizers" / "lm")
        for stage in ("lm", "stage1", "stage2"):
            config = configs.train_config(stage, workdir)
            warmup = 3542 // config.batch_size + 1  # stage 1's epoch: every caption record's image decoded
            for name, settings in VARIANTS.items():
                config.data.update(**settings)
                results[stage, name] = cpu_ms_per_batch(config, args.batches, warmup)
            results[stage, "records"] = per_record_ms(config)
    print(f"blip2-jax demo's input pipeline, batch 64; {start:%Y-%m-%d %H:%M %Z}; {cpu_name()}, "
          f"{os.cpu_count()} cores; load average {load_average(load_before)} before, "
          f"{load_average(os.getloadavg())} after; {args.batches} batches after a 56-batch warm-up")
    print(f"  {'run':<8}{'threads':>10}{'inline':>10}{'demo':>10}{'threads / demo':>16}"
          f"{'no memo':>10}{'memo':>8}   (CPU ms / batch; per record)")
    for stage in ("lm", "stage1", "stage2"):
        plain, memo = results[stage, "records"]
        print(f"  {stage:<8}" + "".join(f"{results[stage, n]:>10.1f}" for n in VARIANTS)
              + f"{results[stage, 'threads'] / results[stage, 'demo']:>15.1f}x{plain:>10.3f}{memo:>8.3f}")


if __name__ == "__main__":
    main()
