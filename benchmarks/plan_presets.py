"""`blip2-jax plan` for every full-size preset on its recommended mesh for 8 x H100, v4-32 and v5e-256.

    python benchmarks/plan_presets.py --out /tmp/plans.jsonl            # ~50 compiles, ~1 min each here
    python benchmarks/plan_presets.py --out /tmp/plans.jsonl --shard 0/2  # run halves side by side
    python benchmarks/plan_presets.py --out /tmp/ft.jsonl --only finetune.py  # one config file's rows
    python benchmarks/plan_presets.py --table /tmp/plans.jsonl          # the README's markdown table

Each row compiles the preset's real train step ahead of time for the mesh (`train/plan.py`) on 16
simulated CPU devices; v5e-256 meshes are planned by folding their data axis (one replica at its
share of the batch, which holds exactly the per-device bytes of the whole mesh). The meshes: 8 x H100
is 8 devices of 80 GiB, a v4-32 slice 16 chips of 32 GiB, v5e-256 256 chips of 16 GiB. A global batch
is the paper's where it divides over the mesh's devices, else the nearest multiple of them (noted).
Results are appended one JSON line per row, so an interrupted run keeps what it finished and `--table`
renders whatever the file holds. Temporaries are XLA:CPU's estimate (no accelerator fusion).
"""
# pylint: disable=import-outside-toplevel
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIMULATED = 16
# device -> (name in plan.DEVICES, devices in the slice)
DEVICES = {"8xH100": ("h100", 8), "v4-32": ("v4", 16), "v5e-256": ("v5e", 256)}
# (config file, preset) -> {device: (mesh "data=D,fsdp=F", remat policy)}. Stage 1 trains only the
# Q-Former: data parallel. Stage 2 shards the frozen LLM over fsdp where it would crowd the chip;
# fine-tuning trains the ViT-g (1B parameters, 16 GB of fp32 weights and Adam moments): fsdp=8.
_PRETRAIN_FULL = {"8xH100": ("data=8", "full"), "v4-32": ("data=16", "full"), "v5e-256": ("data=256", "none")}
_FSDP8 = {"8xH100": ("fsdp=8", "full"), "v4-32": ("data=2,fsdp=8", "full"), "v5e-256": ("data=32,fsdp=8", "full")}
PRESETS = {
    ("stage1.py", "vit_l"): _PRETRAIN_FULL,
    ("stage1.py", "vit_g"): _PRETRAIN_FULL,
    ("stage2_opt.py", "opt2.7b"): {**_PRETRAIN_FULL, "v5e-256": ("data=64,fsdp=4", "full")},
    # fsdp=2 on a v4-32 peaks at 32.1 GiB, just over the chip
    ("stage2_opt.py", "opt6.7b"): {"8xH100": ("data=8", "full"), "v4-32": ("data=4,fsdp=4", "full"),
                                   "v5e-256": ("data=32,fsdp=8", "full")},
    ("stage2_t5.py", "flant5xl"): {**_PRETRAIN_FULL, "v5e-256": ("data=64,fsdp=4", "full")},
    ("stage2_t5.py", "flant5xxl"): {**_FSDP8, "v4-32": ("data=4,fsdp=4", "full")},
    **{("finetune.py", p): _FSDP8 for p in (
        "caption_coco_opt2.7b", "caption_coco_opt6.7b", "caption_coco_flant5xl", "vqa_opt2.7b", "vqa_opt6.7b",
        "vqa_flant5xl", "retrieval_coco_vit_g", "retrieval_coco_vit_l")},
    # InstructBLIP instruction tuning: the frozen 13B / 11B LLM sharded over fsdp as stage 2's largest
    ("instruct.py", "vicuna13b"): {**_FSDP8, "v4-32": ("data=2,fsdp=8", "full")},
    ("instruct.py", "flant5xxl"): {**_FSDP8, "v4-32": ("data=4,fsdp=4", "full")},
}


def rows() -> list[tuple[str, str, str]]:
    return [(file, preset, device) for (file, preset), meshes in PRESETS.items() for device in meshes]


def _load(file: str, preset: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(file).stem, ROOT / "configs" / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


def plan_row(file: str, preset: str, device: str) -> dict:
    from blip2_jax.train import plan as plan_lib

    mesh_text, remat = PRESETS[(file, preset)][device]
    mesh = plan_lib.parse_mesh(mesh_text)
    _, devices = DEVICES[device]
    mesh["data"] = devices // (mesh["fsdp"] * mesh["tensor"])
    config = _load(file, preset)
    paper_batch = config.batch_size
    config.batch_size = max(1, round(paper_batch / devices)) * devices  # the nearest multiple of the devices
    config.model.remat_policy = remat
    tick = time.perf_counter()
    plan = plan_lib.make_plan(config, mesh)
    return {"config": file, "preset": preset, "device": device, "mesh": plan.mesh, "remat": remat,
            "batch": config.batch_size, "paper_batch": paper_batch, "compile_s": time.perf_counter() - tick,
            "params": plan.params_bytes, "optimizer": plan.optimizer_bytes, "frozen": plan.frozen_bytes,
            "batch_bytes": plan.batch_bytes, "temp": plan.temp_bytes, "peak": plan.peak_bytes,
            "flops_per_sample": plan.flops_per_sample, "compiled_devices": plan.compiled_devices or devices,
            "fits": {k: plan.fits(k) for k in ("v4", "v5e", "h100")},
            "mfu_to_match_paper": plan.mfu_to_match_paper(DEVICES[device][0], "stage1" if config.stage == "stage1"
                                                          else "stage2")}


def table(path: Path) -> str:
    gib = float(1 << 30)
    lines = ["| preset | device: mesh, batch, remat | per device: state / frozen / temporaries = peak (GiB) | "
             "fits v4 / v5e / H100 | FLOPs / sample | MFU to match the paper |", "|---|---|---|---|---|---|"]
    order = {row: i for i, row in enumerate(rows())}
    results = [json.loads(line) for line in path.read_text().splitlines()]
    for r in sorted(results, key=lambda r: order.get((r["config"], r["preset"], r["device"]), len(order))):
        mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1)
        batch = f"{r['batch']}" + ("" if r["batch"] == r["paper_batch"] else f" (paper {r['paper_batch']})")
        fits = " / ".join("yes" if r["fits"][k] else "no" for k in ("v4", "v5e", "h100"))
        state = (r["params"] + r["optimizer"]) / gib
        # the paper's compute (spec §16) is its pre-training; fine-tuning and instruction tuning have no published rate
        mfu = "—" if r["config"] in ("finetune.py", "instruct.py") else f"{r['mfu_to_match_paper']:.1%}"
        lines.append(f"| `{Path(r['config']).stem}:{r['preset']}` | {r['device']}: {mesh}, {batch}, {r['remat']} | "
                     f"{state:.2f} / {r['frozen'] / gib:.2f} / {r['temp'] / gib:.1f} = **{r['peak'] / gib:.1f}** | "
                     f"{fits} | {r['flops_per_sample']:.2e} | {mfu} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, help="append one JSON line per planned row here")
    parser.add_argument("--shard", default="0/1", help="i/n: plan every n-th row from the i-th")
    parser.add_argument("--table", type=Path, help="print the markdown table of a results file and exit")
    parser.add_argument("--only", default="", help="plan only the rows of this config file (e.g. finetune.py)")
    args = parser.parse_args()
    if args.table:
        print(table(args.table))
        return
    if args.out is None:
        parser.error("--out is required to plan")
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={SIMULATED}"
    import jax

    jax.config.update("jax_platforms", "cpu")
    index, count = (int(x) for x in args.shard.split("/"))
    done = set()
    if args.out.exists():
        done = {(r["config"], r["preset"], r["device"]) for r in map(json.loads, args.out.read_text().splitlines())}
    for row in [r for r in rows() if args.only in ("", r[0])][index::count]:
        if row in done:
            continue
        print("planning", *row, flush=True)
        try:
            result = plan_row(*row)
        except Exception as e:  # pylint: disable=broad-except  # one failing row must not lose the others
            print(f"  failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            continue
        with args.out.open("a") as f:
            f.write(json.dumps(result) + "\n")
        print(f"  peak {result['peak'] / (1 << 30):.1f} GiB, compiled in {result['compile_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
