"""`blip2-jax plan`'s memory prediction against a real train step on this CPU.

    python benchmarks/plan_vs_measured.py            # ~3 min on 2 cores

For each (config, preset, batch) a fresh process, on one CPU device:
1. plans the step (`train/plan.make_plan`: arguments, outputs, donated aliases, temporaries);
2. places a train state, the frozen towers and a batch of those shapes (zeros: memory does not
   depend on the values) and measures the resident-memory increase: the *arguments*;
3. runs the compiled step once and samples resident memory every 0.2 ms while it runs: the increase
   over what was resident before it is the step's *working memory*, predicted as temporaries +
   outputs - donated aliases.
glibc is told to serve every allocation above 64 KiB by mmap (MALLOC_MMAP_THRESHOLD_), so freed
buffers leave the resident set at once and it tracks live buffers rather than the allocator's cache.
"""
# pylint: disable=import-outside-toplevel
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = [("stage1.py", "tiny", 64), ("stage2_opt.py", "tiny", 64), ("stage2_t5.py", "tiny", 64),
         ("demo.py", "stage1", 256), ("demo.py", "stage2", 256)]
MIB = 1 << 20


def _rss() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(file: str, preset: str, batch: int) -> dict:
    import jax
    import jax.numpy as jnp

    from blip2_jax.parallel import mesh as mesh_lib
    from blip2_jax.train import plan as plan_lib
    from blip2_jax.train.layout import build_layout
    from tests.test_train import load_config

    config = load_config(f"configs/{file}", preset)
    config.batch_size = batch
    plan = plan_lib.make_plan(config, {"data": 1, "fsdp": 1, "tensor": 1})
    layout = build_layout(config, mesh_lib.make_mesh(1, 1, 1, jax.devices()[:1]))
    batch_abstract = layout.batch_abstract()
    step = layout.step_fn({k: v.sharding for k, v in batch_abstract.items()})
    abstract = (layout.state_abstract, layout.frozen_abstract, batch_abstract)
    compiled = step.lower(*abstract).compile()
    before_args = _rss()
    args = jax.tree.map(lambda a: jax.device_put(jnp.zeros(a.shape, a.dtype), a.sharding), abstract)
    jax.block_until_ready(args)
    before_step = _rss()
    peak, running = [before_step], [True]

    def sample():
        while running[0]:
            peak[0] = max(peak[0], _rss())
            time.sleep(0.0002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    jax.block_until_ready(compiled(*args))
    running[0] = False
    sampler.join()
    return {"case": f"{file}:{preset}", "batch": batch,
            "arguments_predicted": plan.argument_bytes, "arguments_measured": before_step - before_args,
            "working_predicted": plan.output_bytes - plan.alias_bytes + plan.temp_bytes,
            "working_measured": peak[0] - before_step}


def main() -> None:
    if len(sys.argv) == 4:  # a child: one case
        print(json.dumps(measure(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    print("| case | batch | arguments: predicted / measured (MiB) | step working memory: predicted / measured (MiB) |")
    print("|---|---|---|---|")
    for file, preset, batch in CASES:
        out = subprocess.run([sys.executable, __file__, file, preset, str(batch)], env=env, cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"| `{r['case']}` | {r['batch']} | {r['arguments_predicted'] / MIB:.1f} / "
              f"{r['arguments_measured'] / MIB:.1f} | {r['working_predicted'] / MIB:.1f} / "
              f"{r['working_measured'] / MIB:.1f} ({r['working_measured'] / r['working_predicted']:.2f}x) |",
              flush=True)


if __name__ == "__main__":
    main()
