"""Host memory of loading a multi-GB checkpoint onto a mesh: `weights.load` (straight into the
shardings) against the whole-tree path it replaces (read every leaf to host numpy, then
`device_put`), both in the same run.

The checkpoint is `benchmarks/convert_memory.py`'s: EVA ViT-g + BERT-base Q-Former + OPT-1.3b sizes,
about 2.4 B parameters, float16 safetensors in 2 GB shards, plus the model checkpoint
`blip2-jax convert from-hf --out_dtype D` makes of it; both are loaded as D (`--dtype`, default bfloat16,
so that the whole-tree path fits in 24 GB beside the placed arrays). Each load runs in a fresh process on 8
simulated CPU devices with fsdp=8 and reports:
- peak RSS (the kernel's high-water mark, read before anything else is touched);
- the runtime's own RSS before the load (JAX and the mesh);
- the bytes the placed arrays hold (each device's shards: on simulated devices these live in host
  memory, on accelerators they would not);
- what is left, peak - runtime - placed: the transient host copies the load made, which the issue
  bounds by 1.5 x the largest leaf.
Every leaf's SHA-256 must agree between the two paths (bit for bit).

    python benchmarks/load_memory.py --workdir /tmp/load_bench [--dtype bfloat16] [--keep]
"""
# Frameworks are imported inside the functions that use them (a child pays only for its own).
# pylint: disable=import-outside-toplevel
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

GB = 10**9
DEVICES = 8


def _rss(field: str) -> int:
    """VmRSS or VmHWM (peak) of this process, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(mode: str, src: str, dtype: str) -> None:
    """One load onto fsdp=8; prints seconds, runtime and peak RSS, placed bytes and leaf digests."""
    import jax
    import numpy as np
    from flax import traverse_util

    from blip2_jax.models import blip2
    from blip2_jax.parallel import mesh as mesh_lib

    mesh = mesh_lib.make_mesh(data=1, fsdp=DEVICES, tensor=1)
    runtime = _rss("VmRSS")
    tick = time.perf_counter()
    if mode.startswith("weights"):
        from blip2_jax.weights.load import load

        loaded = load(src, mesh=mesh, dtype=dtype)
        params, config, architecture = loaded.params, loaded.config, loaded.architecture
    else:  # the whole-tree path: every leaf on the host, then placed
        if mode == "tree-hf":
            from blip2_jax.weights.hf_checkpoint import load_pretrained

            config, tree = load_pretrained(src, dtype=dtype)
            architecture = blip2.architecture_of(config)
        else:
            from blip2_jax.weights.model_checkpoint import CheckpointParams

            source = CheckpointParams.open(src)
            config, architecture = source.config, source.architecture
            tree = jax.tree.map(lambda x: x.astype(dtype, copy=False), source.tree())
        boxed = blip2.abstract_params(config, unbox=False, model=blip2.build(config, architecture))
        params = jax.device_put(tree, mesh_lib.logical_shardings(boxed, mesh))
        del tree
    jax.block_until_ready(params)
    seconds, peak = time.perf_counter() - tick, _rss("VmHWM")
    flat = traverse_util.flatten_dict(params, sep="/")
    placed = sum(s.data.nbytes for leaf in flat.values() for s in leaf.addressable_shards)
    largest = max(leaf.nbytes for leaf in flat.values())
    digests = {p: hashlib.sha256(np.asarray(leaf).tobytes()).hexdigest() for p, leaf in sorted(flat.items())}
    print(json.dumps(dict(seconds=seconds, runtime=runtime, peak=peak, placed=placed, largest=largest,
                          params=sum(leaf.size for leaf in flat.values()), digests=digests)))


def _run_child(mode: str, src: Path, dtype: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICES}")
    proc = subprocess.run([sys.executable, __file__, "--child", mode, str(src), dtype], check=True,
                          capture_output=True, text=True, env=env)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    from convert_memory import arguments, fresh_source

    parser = arguments(__doc__.splitlines()[0], "/tmp/load_bench")
    parser.add_argument("--dtype", default="bfloat16", help="the loaded parameters' dtype")
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    from common import cpu_name

    tick = time.perf_counter()
    source = fresh_source(args)
    subprocess.run([sys.executable, "-c", "import sys; from blip2_jax.convert import hf_export; "
                    "hf_export.from_hf(sys.argv[1], sys.argv[2], dtype=sys.argv[3])", str(args.workdir / "hf"),
                    str(args.workdir / "model_checkpoint"), args.dtype], check=True, capture_output=True)
    print(f"device: CPU {cpu_name()}, {DEVICES} simulated devices, fsdp={DEVICES}; sources written in "
          f"{time.perf_counter() - tick:.0f} s: {source['params'] / 1e9:.2f} B params, "
          f"HF {source['total'] / GB:.2f} GB float16 in {source['shards']} shards, model checkpoint and loaded "
          f"parameters {args.dtype}")
    print(f"  {'source':<17} {'path':<14} {'seconds':>7} {'runtime':>8} {'peak RSS':>9} {'placed':>7} "
          f"{'transient':>9}  bound (1.5 x largest leaf)")
    for name, src in (("HF safetensors", args.workdir / "hf"), ("model checkpoint", args.workdir / "model_checkpoint")):
        results = {}
        for mode in ("weights.load", "tree-hf" if name.startswith("HF") else "tree-ckpt"):
            r = results[mode] = _run_child(mode, src, args.dtype)
            transient = r["peak"] - r["runtime"] - r["placed"]
            bound = 1.5 * r["largest"]
            print(f"  {name:<17} {mode:<14} {r['seconds']:7.1f} {r['runtime'] / GB:7.2f}G {r['peak'] / GB:8.2f}G "
                  f"{r['placed'] / GB:6.2f}G {transient / GB:8.2f}G  {bound / GB:.2f}G "
                  f"{'within' if transient <= bound else 'ABOVE'}")
        new, old = results.values()
        same = new["digests"] == old["digests"]
        transients = [r["peak"] - r["runtime"] - r["placed"] for r in (old, new)]
        print(f"  {name}: {len(new['digests'])} leaves, {new['params'] / 1e9:.2f} B params, "
              f"{'bit-identical' if same else 'DIFFERENT'}; transient host memory "
              f"{transients[0] / max(transients[1], 1):.1f}x less, peak RSS {old['peak'] / new['peak']:.2f}x less, "
              f"time {old['seconds'] / new['seconds']:.2f}x")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
