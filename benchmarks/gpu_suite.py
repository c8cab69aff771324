"""The GPU suite: what one lent GPU tells us, in one call (`bash benchmarks/gpu_suite.sh`).

    bash benchmarks/gpu_suite.sh            # on one H100/H200: ~6-8 min, prints the table below
    bash benchmarks/gpu_suite.sh --tiny     # the same code at tiny sizes on the CPU (~2 min; a test runs it)

Parts, each in its own process (a fresh device, a crash or out-of-memory in one leaves the others):
  stage1   the stage-1 train step (ITC + ITM + ITG) of `configs/stage1.py:vit_g` (EVA ViT-g frozen in bf16,
           BERT-base Q-Former) in bf16 compute at the largest batch of `--stage1-batches` that fits:
           images/s, MFU.
  stage2   the stage-2 train step of `configs/stage2_opt.py:opt2.7b` (ViT-g and OPT-2.7B frozen in bf16):
           tokens/s, MFU.
  caption  BLIP-2 OPT-2.7B (random weights built by `transformers` on the device, loaded into ours):
           ours in fp32 against `transformers` in fp32 (same function), bf16 against fp32 logits for both,
           and beam-5 captioning, ours (`generation.decode.generate_fn`) against `transformers.generate`
           on the same device, bf16, as a ratio, with how many captions agree token for token.
For both train steps the predicted per-device memory of `blip2-jax plan` (the compiled executable's
memory analysis: arguments + outputs - donated + temporaries) is set against what the device's
allocator saw (`memory_stats()`: peak bytes in use during the steps, less what was resident besides
the step's own arguments). The step that is timed is the very executable the prediction came from.

MFU counts the matrix FLOPs of the step's jaxpr (`train/flops.py`, every scanned layer) without
rematerialisation (model FLOPs) over the device's peak bf16 rate (`train/metrics.py`'s table); HFU
counts them with the recomputed forward; both are also given against a bf16 matmul measured here.
Timings: median of `--steps` steps (or `--runs` runs) after one warm-up. Results go to stdout and,
one JSON object per part, to `--out` (default `$OUT`, else nothing).
"""
# Frameworks are imported inside the functions that use them: each part pays only for its own.
# pylint: disable=import-outside-toplevel
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULT = "RESULT "  # prefix of a part's one line of JSON on stdout
GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What each part runs at: the full sizes for a GPU, or tiny ones for the CPU."""

    stage1: str  # configs/stage1.py preset
    stage1_batches: tuple[int, ...]  # tried largest first; the first whose predicted peak fits runs
    stage1_remat: str
    stage2: str  # configs/stage2_opt.py preset
    stage2_batches: tuple[int, ...]
    stage2_remat: str
    caption_model: str  # models/presets.py name
    caption_batch: int
    beams: int
    new_tokens: int


FULL = Sizes(stage1="vit_g", stage1_batches=(1024, 512, 256), stage1_remat="full",
             stage2="opt2.7b", stage2_batches=(256, 128, 64), stage2_remat="none",
             caption_model="opt2.7b", caption_batch=16, beams=5, new_tokens=20)
TINY = Sizes(stage1="tiny", stage1_batches=(16, 8), stage1_remat="full",
             stage2="tiny", stage2_batches=(16, 8), stage2_remat="none",
             caption_model="tiny", caption_batch=4, beams=3, new_tokens=6)


def _load_config(file: str, preset: str):
    spec = importlib.util.spec_from_file_location(Path(file).stem, REPO / "configs" / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


def _memory_stats() -> dict[str, int] | None:
    import jax

    return jax.devices()[0].memory_stats() or None


def _tree_bytes(tree: Any) -> int:
    import jax

    return sum(x.nbytes for x in jax.tree.leaves(tree))


def bf16_matmul_tflops(n: int, reps: int = 10) -> float:
    """Median rate of a jitted n^3 bf16 `jnp.dot` on random data: the ceiling measured here."""
    import jax
    import jax.numpy as jnp

    a, b = jax.random.normal(jax.random.PRNGKey(0), (2, n, n), jnp.bfloat16)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    times = []
    for _ in range(reps):
        tick = time.perf_counter()
        dot(a, b).block_until_ready()
        times.append(time.perf_counter() - tick)
    return 2 * n ** 3 / statistics.median(times) / 1e12


def _kernel_threads(meta: list[dict[str, Any]]) -> set[tuple[int, int]]:
    """(pid, tid) of the trace lines that hold the device's own work: a GPU's streams, else XLA:CPU's
    executor threads."""
    process = {e["pid"]: e["args"]["name"] for e in meta if e["name"] == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in meta if e["name"] == "thread_name"}
    streams = {k for k, name in threads.items() if process.get(k[0], "").startswith("/device:") and "Stream" in name}
    return streams or {k for k, name in threads.items() if name.startswith("tf_XLA")}


def profile(fn, out_dir: Path | None, name: str) -> dict[str, Any]:
    """One call of `fn` under `jax.profiler`: the device time by op (top 15), and the Perfetto trace
    copied to `out_dir` as `<name>_trace.json.gz` for a closer look (ui.perfetto.dev)."""
    import collections
    import gzip
    import shutil
    import tempfile

    import jax

    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            fn()
        path = next(Path(tmp).rglob("perfetto_trace.json.gz"))
        events = json.load(gzip.open(path))
        events = events["traceEvents"] if isinstance(events, dict) else events
        if out_dir and path.stat().st_size < 15 << 20:
            out_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, out_dir / f"{name}_trace.json.gz")
    lines = _kernel_threads([e for e in events if e.get("ph") == "M"])
    by_name: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.get("ph") == "X" and (e.get("pid"), e.get("tid")) in lines:
            by_name[e["name"]][0] += e.get("dur", 0.0) / 1e3
            by_name[e["name"]][1] += 1
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:15]
    return dict(busy_ms=sum(v[0] for v in by_name.values()), kernels=sum(v[1] for v in by_name.values()),
                top=[(k, round(v[0], 3), v[1]) for k, v in top])


def _timed(fn, n: int) -> list[float]:
    times = []
    for i in range(n):
        tick = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - tick)
    return times


def run_train(part: str, sizes: Sizes, steps: int, profile_dir: Path | None) -> dict[str, Any]:
    """One stage's train step: compiled from shapes (the plan), then run on real arrays."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from blip2_jax.data.synthetic import SyntheticData
    from blip2_jax.models import blip2
    from blip2_jax.parallel import mesh as mesh_lib
    from blip2_jax.train.flops import matmul_flops
    from blip2_jax.train.layout import build_layout, data_args
    from blip2_jax.train.metrics import peak_flops_per_device
    from blip2_jax.train.partition import partition
    from blip2_jax.train.plan import compile_step

    file, preset, batches, remat = ((f"{part}.py", sizes.stage1, sizes.stage1_batches, sizes.stage1_remat)
                                    if part == "stage1" else
                                    ("stage2_opt.py", sizes.stage2, sizes.stage2_batches, sizes.stage2_remat))
    config = _load_config(file, preset)
    config.model.dtype = "bfloat16"
    config.model.remat_policy = remat
    config.frozen_dtype = "bfloat16"
    config.mesh.update(data=1, fsdp=1, tensor=1)
    mesh = mesh_lib.make_mesh(1, 1, 1, jax.devices()[:1])
    stats = _memory_stats()
    limit = stats["bytes_limit"] if stats else None
    tried = []
    for batch in batches:  # largest first; compiling is what a misfit costs
        config.batch_size = batch
        tick = time.perf_counter()
        step = compile_step(config, mesh)
        plan = step.plan()
        tried.append(dict(batch=batch, predicted_peak_gib=plan.peak_bytes / GIB, compile_s=time.perf_counter() - tick))
        if limit is None or plan.peak_bytes <= 0.97 * limit:
            break
    else:
        raise RuntimeError(f"no batch of {batches} fits: {tried}")
    layout = step.layout
    model_config = config.copy_and_resolve_references()
    model_config.model.remat_policy = "none"
    no_remat = build_layout(model_config, mesh)
    model_flops = matmul_flops(jax.make_jaxpr(no_remat.step_fn({k: v.sharding for k, v in step.args[2].items()}))(
        no_remat.state_abstract, no_remat.frozen_abstract, step.args[2]).jaxpr)  # the plan's count, no recompute

    frozen_dtype = jnp.dtype(config.frozen_dtype)

    def init(rng):
        trainable, frozen = partition(nn.unbox(blip2.init(layout.model_cfg, rng, layout.model)["params"]),
                                      layout.patterns)
        return trainable, jax.tree.map(lambda x: x.astype(frozen_dtype), frozen)

    trainable, frozen = jax.jit(init, out_shardings=(layout.trainable_shardings, layout.frozen_shardings))(
        jax.random.PRNGKey(config.seed))
    state = jax.jit(layout.create_state, out_shardings=layout.state_shardings)(trainable)
    del trainable
    cfg = layout.model_cfg
    data = SyntheticData(global_batch_size=config.batch_size, text_length=config.data.text_length,
                         **data_args(config, cfg))
    host = [data.batch(i) for i in range(2)]  # two distinct batches, alternated
    device_batches = [{k: jax.device_put(v, step.args[2][k].sharding) for k, v in b.items()} for b in host]
    args_bytes = _tree_bytes(state) + _tree_bytes(frozen) + _tree_bytes(device_batches[0])
    before = _memory_stats()
    out = {}

    def run(i: int) -> None:
        nonlocal state
        state, out["metrics"] = step.compiled(state, frozen, device_batches[i % 2])
        jax.block_until_ready(out["metrics"])

    run(0)  # warm-up
    times = _timed(lambda i: run(i + 1), steps)
    after = _memory_stats()
    seconds = statistics.median(times)
    peak = peak_flops_per_device()
    text_tokens = int(sum(b["text_mask"].sum() for b in host) / len(host))
    result = dict(part=part, preset=f"{file}:{preset}", batch=config.batch_size, remat=remat, tried=tried,
                  step_s=seconds, step_s_min=min(times), step_s_max=max(times),
                  images_per_s=config.batch_size / seconds, text_tokens_per_s=text_tokens / seconds,
                  model_flops=model_flops, hardware_flops=plan.flops_per_step, peak_flops=peak,
                  loss=float(out["metrics"]["loss"]), finite=bool(jnp.isfinite(out["metrics"]["loss"])),
                  predicted_peak_bytes=plan.peak_bytes, predicted_temp_bytes=plan.temp_bytes,
                  argument_bytes=args_bytes)
    if before and after:
        resident_besides = before["bytes_in_use"] - args_bytes  # the other batch, the runtime's own
        result.update(measured_peak_bytes=after["peak_bytes_in_use"] - resident_besides,
                      peak_before_steps=before["peak_bytes_in_use"], peak_after_steps=after["peak_bytes_in_use"],
                      bytes_limit=after["bytes_limit"])
    if jax.default_backend() == "gpu":
        result["matmul_tflops"] = bf16_matmul_tflops(8192)
    if profile_dir:
        result["profile"] = profile(lambda: run(0), profile_dir, part)
    return result


def run_caption(sizes: Sizes, runs: int, profile_dir: Path | None) -> dict[str, Any]:
    """fp32 parity, bf16 error and beam-search captioning, ours against `transformers` on one device."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers

    from blip2_jax.generation.config import GenerationConfig
    from blip2_jax.generation.decode import generate_fn
    from blip2_jax.models import presets
    from blip2_jax.models.blip2 import Blip2ForConditionalGeneration
    from blip2_jax.models.config import to_hf
    from blip2_jax.weights.hf_checkpoint import params_from_state_dict

    gpu = torch.cuda.is_available() and jax.default_backend() == "gpu"
    device = torch.device("cuda" if gpu else "cpu")
    torch.backends.cudnn.allow_tf32 = False  # the fp32 reference is fp32 (the patch conv would be tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = presets.get(sizes.caption_model)
    tick = time.perf_counter()
    torch.manual_seed(0)
    with device:
        hf = transformers.Blip2ForConditionalGeneration(transformers.Blip2Config(**to_hf(cfg))).eval()
    params = params_from_state_dict({k: v.detach().float().cpu().numpy() for k, v in hf.state_dict().items()}, cfg)
    params = jax.device_put(params)
    setup_s = time.perf_counter() - tick

    b, s, q = sizes.caption_batch, cfg.vision.image_size, cfg.num_query_tokens
    images = np.random.default_rng(0).standard_normal((b, s, s, 3)).astype(np.float32)
    prompt = np.array([[cfg.image_token_index] * q + [cfg.text.bos_token_id]] * b, np.int64)
    pixels, ids, mask = jnp.asarray(images), jnp.asarray(prompt, jnp.int32), jnp.ones(prompt.shape, jnp.int32)
    t_pixels = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device)
    t_ids = torch.from_numpy(prompt).to(device)

    def ours_logits(model_cfg, p):
        model = Blip2ForConditionalGeneration(model_cfg)
        fn = jax.jit(lambda p, x, i, m: model.apply({"params": p}, x, i, m).logits)
        return np.asarray(fn(p, pixels, ids, mask).astype(jnp.float32))

    @torch.no_grad()
    def torch_logits(dtype):
        return hf(pixel_values=t_pixels.to(dtype), input_ids=t_ids, attention_mask=torch.ones_like(t_ids)
                  ).logits.float().cpu().numpy()

    def rel(a, ref):
        return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))

    with jax.default_matmul_precision("highest"):
        ref = ours_logits(cfg, params)
    bf16 = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    del params
    ours16 = ours_logits(bf16, params16)
    torch32 = torch_logits(torch.float32)
    hf.to(torch.bfloat16)
    torch16 = torch_logits(torch.bfloat16)
    precision = dict(ours_fp32_vs_torch_fp32=rel(ref, torch32), ours_bf16_vs_fp32=rel(ours16, ref),
                     torch_bf16_vs_fp32=rel(torch16, ref))

    settings = dict(num_beams=sizes.beams, max_new_tokens=sizes.new_tokens)
    fn = generate_fn(Blip2ForConditionalGeneration(bf16), GenerationConfig(**settings))
    tick = time.perf_counter()
    compiled = fn.lower(params16, pixels, ids, mask).compile()
    compile_s = time.perf_counter() - tick
    out = {}

    def ours(_):
        out["ours"] = jax.block_until_ready(compiled(params16, pixels, ids, mask))

    @torch.no_grad()
    def theirs(_):
        out["theirs"] = hf.generate(pixel_values=t_pixels.to(torch.bfloat16), input_ids=t_ids,
                                    attention_mask=torch.ones_like(t_ids), do_sample=False, **settings)
        if gpu:
            torch.cuda.synchronize()

    ours(0), theirs(0)  # warm-up
    t_ours, t_theirs = _timed(ours, runs), _timed(theirs, runs)
    a = np.asarray(out["ours"].tokens[:, 0])
    t = out["theirs"][:, prompt.shape[1]:].cpu().numpy()
    same = sum(x.tolist() == y.tolist() for x, y in zip(a, t))
    extra = {"profile": profile(lambda: ours(0), profile_dir, "caption")} if profile_dir else {}
    return dict(**extra, part="caption", model=sizes.caption_model, batch=b, setup_s=setup_s, compile_s=compile_s,
                **precision, ours_s=statistics.median(t_ours), theirs_s=statistics.median(t_theirs),
                same_ids=same, lengths=sorted({a.shape[1], t.shape[1]}), **settings)


PARTS = ("stage1", "stage2", "caption")


def _part(name: str, args: argparse.Namespace) -> dict[str, Any]:
    sizes = TINY if args.tiny else FULL
    profile_dir = Path(args.out) if args.profile and args.out else None
    if name == "caption":
        return run_caption(sizes, args.runs, profile_dir)
    return run_train(name, sizes, args.steps, profile_dir)


def _child(name: str, args: argparse.Namespace, timeout: float) -> dict[str, Any]:
    """Run one part in a fresh process; a failure or a time-out is reported, not raised."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--steps", str(args.steps),
           "--runs", str(args.runs), "--out", args.out] + ["--tiny"] * args.tiny + ["--profile"] * args.profile
    env = dict(os.environ)
    if name == "caption":  # torch shares the device: JAX takes memory as it needs it
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    else:
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    tick = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return dict(part=name, error=f"timed out after {timeout:.0f} s", log=(e.stderr or b"")[-3000:].decode(
            errors="replace") if isinstance(e.stderr, bytes) else str(e.stderr)[-3000:])
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode or not lines:
        return dict(part=name, error=f"exit {proc.returncode}", log=(proc.stdout + proc.stderr)[-3000:])
    return dict(json.loads(lines[-1][len(RESULT):]), wall_s=time.perf_counter() - tick)


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def _profile_lines(r: dict[str, Any]) -> list[str]:
    if "profile" not in r:
        return []
    p = r["profile"]
    return [f"  profile: {p['busy_ms']:.1f} ms of device work in {p['kernels']} kernels; by op (ms, count):"] + [
        f"    {ms:10.3f} {count:6d}  {name[:110]}" for name, ms, count in p["top"]]


def report(r: dict[str, Any]) -> list[str]:
    """A part's result as the lines of the README table, then its profile if it has one."""
    return _summary(r) + _profile_lines(r)


def _summary(r: dict[str, Any]) -> list[str]:
    if "error" in r:
        return [f"{r['part']}: FAILED ({r['error']})"]
    where = f" on {r['device']}"
    if r["part"] == "caption":
        return [f"caption ({r['model']}, batch {r['batch']}, {r['num_beams']} beams, {r['max_new_tokens']} new "
                f"tokens, bf16){where}: ours {r['ours_s']:.3f} s, transformers {r['theirs_s']:.3f} s -> "
                f"{r['theirs_s'] / r['ours_s']:.2f}x; same ids {r['same_ids']} of {r['batch']}; lengths "
                f"{r['lengths']}; our compile {r['compile_s']:.1f} s",
                f"logits ({r['model']}): ours fp32 vs transformers fp32 {r['ours_fp32_vs_torch_fp32']:.1e}; bf16 vs "
                f"fp32: ours {r['ours_bf16_vs_fp32']:.2e}, transformers {r['torch_bf16_vs_fp32']:.2e} "
                "(relative L2)"]
    mfu = hfu = ""
    rate_model, rate_hw = r["model_flops"] / r["step_s"], r["hardware_flops"] / r["step_s"]
    if r["peak_flops"]:
        mfu = f"; MFU {100 * rate_model / r['peak_flops']:.1f}%"
        hfu = f", HFU {100 * rate_hw / r['peak_flops']:.1f}%"
    if r.get("matmul_tflops"):
        hfu += f"; {100 * rate_model / (r['matmul_tflops'] * 1e12):.1f}% of the measured bf16 matmul " \
               f"({r['matmul_tflops']:.0f} TFLOP/s)"
    lines = [f"{r['part']} ({r['preset']}, bf16, batch {r['batch']}, remat {r['remat']}){where}: {r['step_s']:.3f} s/step "
             f"({r['step_s_min']:.3f}-{r['step_s_max']:.3f}), {r['images_per_s']:.1f} images/s, "
             f"{rate_model / 1e12:.1f} TFLOP/s{mfu}{hfu}; loss {r['loss']:.4f}"]
    memory = f"  memory: plan predicts peak {_gib(r['predicted_peak_bytes'])} (temporaries " \
             f"{_gib(r['predicted_temp_bytes'])})"
    if "measured_peak_bytes" in r:
        memory += f"; allocator measured {_gib(r['measured_peak_bytes'])} " \
                  f"({r['measured_peak_bytes'] / r['predicted_peak_bytes']:.2f}x) of {_gib(r['bytes_limit'])}"
        if r["peak_after_steps"] <= r["peak_before_steps"]:
            memory += " (the peak came before the steps: set-up, not the step)"
    else:
        memory += "; the CPU backend keeps no allocator statistics"
    return lines + [memory]


def _device() -> str:
    import jax

    device = jax.devices()[0]
    return f"{device.platform}: {device.device_kind} x {jax.device_count()}"


def parent(args: argparse.Namespace) -> int:
    """Runs the parts one after another. It never touches a device itself: on a GPU, JAX would take
    75% of its memory in this process for the whole run."""
    start = datetime.datetime.now().astimezone()
    out_dir = Path(args.out) if args.out else None
    versions = {}
    for name in ("jax", "jaxlib", "flax", "optax", "torch", "transformers"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = "missing"
    header = [f"blip2_jax GPU suite{' (--tiny)' if args.tiny else ''}: {start:%Y-%m-%d %H:%M %Z}; host "
              f"{platform.node()}, {os.cpu_count()} CPUs",
              "versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
              f"command: {' '.join(sys.argv)}"]
    print("\n".join(header), flush=True)
    results, deadline = [], time.monotonic() + args.budget
    for name in args.parts.split(","):
        left = deadline - time.monotonic()
        if left < 20:
            results.append(dict(part=name, error="skipped: the suite's time budget is spent"))
            continue
        r = _child(name, args, timeout=min(left, args.part_timeout))
        results.append(r)
        print("\n".join(report(r)), flush=True)
        if "log" in r:
            print(r["log"], flush=True)
        if out_dir:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "gpu_suite.json").write_text(json.dumps(dict(header=header, results=results), indent=1))
    print("\n== summary ==\n" + "\n".join(header) + "\n" + "\n".join(sum((report(r) for r in results), [])))
    return 1 if any("error" in r for r in results) else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (the CPU check of this script)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    parser.add_argument("--steps", type=int, default=5, help="timed train steps per part (after 1 warm-up)")
    parser.add_argument("--runs", type=int, default=3, help="timed captioning runs per framework (after 1 warm-up)")
    parser.add_argument("--budget", type=float, default=500, help="seconds for the whole suite")
    parser.add_argument("--part-timeout", type=float, default=240, help="seconds for one part")
    parser.add_argument("--out", default=os.environ.get("OUT", ""), help="directory for gpu_suite.json (and traces)")
    parser.add_argument("--profile", action="store_true",
                        help="also trace one step (one captioning batch) of each part: device time by op, and the "
                             "Perfetto trace in --out")
    parser.add_argument("--part", choices=PARTS, default=None, help="internal: run one part in this process")
    args = parser.parse_args()
    if args.part:
        print(RESULT + json.dumps(dict(_part(args.part, args), device=_device())), flush=True)
        return
    sys.exit(parent(args))


if __name__ == "__main__":
    main()
