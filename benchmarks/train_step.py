"""Stage-2 (OPT) training step: blip2_jax against `transformers`' PyTorch BLIP-2, time and memory.

    python benchmarks/train_step.py               # 5 timed steps per framework: ~3.5 min on 2 idle cores
    python benchmarks/train_step.py --steps 3     # ~2.7 min (twice that on busy cores)
    python benchmarks/train_step.py --rounds 3    # the two children in turn 3 times, steps pooled: ~8 min

What it measures: one optimizer step of BLIP-2 stage 2 (image-conditioned LM loss through a
frozen OPT) on a ViT-B/16-sized EVA-style vision tower (768 wide, 12 layers, 224 px), a BERT-base
Q-Former (32 queries, cross-attention every 2nd layer) and an OPT-125m-sized LM (vocab 50272),
batch `--batch` with `--text-length` text tokens after the 32 queries, fp32, dropout on, AdamW
(decay on matrices, none on biases and 1-d leaves) over what stage 2 trains: the Q-Former, query
tokens, language projection and ln_vision. The ViT and OPT are frozen; the gradient still flows
back through OPT's activations.
  ours:   `blip2_jax.train.step.train_step` jitted with the state donated and the frozen towers
          as arguments (so XLA forms no weight gradients for them).
  theirs: `transformers.Blip2ForConditionalGeneration` in train mode with `requires_grad_(False)`
          on the ViT (except post_layernorm) and OPT, `torch.optim.AdamW` on the rest,
          `loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)`.
Both load the same random weights (one `transformers` model saved to a temporary directory) and
see the same synthetic batches; the `eval loss` row (batch 0, dropout off, before training) shows
they compute the same function. Each framework runs in its own subprocess (`--framework`).

How to read it:
  step time: median over `--steps` timed steps after one warm-up step (and, for ours, the
    compile, reported apart). `torch / ours` > 1 means ours is faster; the issue's CPU target is 1.35.
    With `--rounds R` the children run torch, jax, torch, jax, ... and the step rows pool all R x
    `--steps` steps (each round's median printed beside): on a shared machine PyTorch's step has
    moved from 5.9 to 6.9 s between two runs minutes apart, more than ours did.
    `step CPU time` is the process's CPU seconds per step (all threads): less sensitive than wall
    time to other work on the machine, since the two children run at different moments.
  peak memory: the child's peak RSS (`ru_maxrss`) minus its RSS right after importing and
    initialising its framework: weights, optimizer state, activations and workspaces, not library
    code, but also what loading the weights (and, for ours, compiling) briefly took. `during
    steps` restarts the high-water mark (Linux `/proc/self/clear_refs`, after `malloc_trim`) just
    before the warm-up step: the training step's peak, resident weights and optimizer state
    included, without setup transients. `XLA buffers` is our compiled step's own account
    (`memory_analysis()`): arguments (state, frozen towers, batch) and temporaries.
  FLOPs: `XLA` is `jax.jit(step).lower(...).compile().cost_analysis()['flops']`, which counts
    the body of each scanned layer stack once (a while loop), far below the real count.
    `matmuls` (`blip2_jax.train.flops`) counts every dot and convolution in the step's jaxpr with
    each scan body times its length: the step's real matrix work. `fp32 matmul` is the best of a
    few jitted 2048^3 `jnp.dot`s in our child right after its timed steps; `floor` = matmul FLOPs
    / that rate, a lower bound on any step on this machine, so `torch / floor` is the largest
    speed-up on offer. `XLA's kernels` runs each distinct dot and convolution of the step jitted
    alone, times its count (`common.kernel_seconds`): the least time a step on XLA's own kernels
    could take with everything else free, so `torch / that` is the most it could gain.
  The GPU figures (MFU of full-size steps, captioning against transformers on one GPU) are
  `benchmarks/gpu_suite.sh`'s.
Timings share the machine with whatever else runs: the load average is printed before and after
(and per child after its steps, where its own threads count too), with a warning when other work
was running. Then the numbers are noisy, and PyTorch's step slows far more than ours on
oversubscribed cores (on 2 cores shared with another busy process: about 4-5x against 2x), so
the ratio means something only from a quiet run.
"""
# Frameworks are imported inside the functions that use them, so that each child process pays
# only for its own before its RSS baseline.
# pylint: disable=import-outside-toplevel
from __future__ import annotations

import argparse
import ctypes
import datetime
import functools
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from common import (IMAGE_TOKEN_INDEX, NUM_QUERY_TOKENS, VISION, cpu_name, kernel_seconds, load_average,
                    matmul_gflops, row, save_weights)

REPO = Path(__file__).resolve().parent.parent
LR, WEIGHT_DECAY, BETAS, EPS = 1e-4, 0.05, (0.9, 0.999), 1e-8
RESULT = "RESULT "  # prefix of the child's one line of JSON on stdout


def _status_mib(field: str) -> float:
    """A memory field of /proc/self/status (Linux), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _reset_peak_rss() -> None:
    """Start the RSS high-water mark (VmHWM) afresh at the current RSS, after handing the heap
    that malloc keeps but nothing uses (XLA's compile leaves hundreds of MiB) back to the OS."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


def _memory(base: float) -> dict[str, float]:
    """At the end of a child: peak RSS over the whole run and since `_reset_peak_rss`, above `base`."""
    return dict(peak_mib=_peak_rss_mib() - base, step_peak_mib=_status_mib("VmHWM") - base)


def _batches(args: argparse.Namespace) -> list[dict[str, np.ndarray]]:
    """Batch 0 (warm-up and eval) and one batch per timed step, as NHWC images and OPT ids."""
    from blip2_jax.data.synthetic import SyntheticData

    data = SyntheticData("stage2_opt", args.batch, VISION["image_size"], args.text_length, IMAGE_TOKEN_INDEX)
    return [data.batch(i) for i in range(args.steps + 1)]


def _timed(step: Callable[[int], object], steps: int) -> dict[str, list[float]]:
    """Wall and process CPU time of `step(i)` (which must wait for its result) for i = 1..steps."""
    wall, cpu = [], []
    for i in range(1, steps + 1):
        tick, cpu_tick = time.perf_counter(), time.process_time()
        step(i)
        wall.append(time.perf_counter() - tick)
        cpu.append(time.process_time() - cpu_tick)
    return dict(times=wall, cpu_times=cpu, load=os.getloadavg()[0])


def _xla_flops(compiled: Any) -> float:
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis["flops"])


def run_jax(args: argparse.Namespace) -> dict[str, Any]:
    """Our stage-2 step on the saved weights."""
    import jax

    from blip2_jax.models.blip2 import Blip2ForConditionalGeneration
    from blip2_jax.objectives.stage2 import stage2_loss
    from blip2_jax.train.flops import equations_flops, matmul_equations
    from blip2_jax.train.optim import default_config, make_optimizer
    from blip2_jax.train.partition import merge, partition, patterns_for
    from blip2_jax.train.state import TrainState
    from blip2_jax.train.step import train_step
    from blip2_jax.weights.hf_checkpoint import load_pretrained

    device = jax.devices()[0]
    base = _status_mib("VmRSS")
    batches = [jax.device_put(b) for b in _batches(args)]
    cfg, params = load_pretrained(args.weights)
    model = Blip2ForConditionalGeneration(cfg)
    trainable, frozen = jax.device_put(partition(params, patterns_for("stage2")))
    del params
    optim = default_config()
    optim.update(schedule="constant", lr=LR, weight_decay=WEIGHT_DECAY, b1=BETAS[0], b2=BETAS[1], eps=EPS)
    tx = make_optimizer(optim, trainable)
    loss_fn = functools.partial(stage2_loss, model=model)
    key = jax.random.PRNGKey(0)
    eval_loss = jax.jit(functools.partial(loss_fn, deterministic=True))(merge(trainable, frozen), batches[0], key)[0]
    eval_loss = float(eval_loss)
    state = TrainState.create(trainable, tx, key)
    counts = [sum(x.size for x in jax.tree.leaves(t)) for t in (trainable, frozen)]
    del trainable  # donated with the state from the first step on

    step_fn = functools.partial(train_step, loss_fn=loss_fn, tx=tx)
    matmuls = matmul_equations(jax.make_jaxpr(step_fn)(state, frozen, batches[0]).jaxpr)
    flops = equations_flops(matmuls)
    tick = time.perf_counter()
    compiled = jax.jit(step_fn, donate_argnums=0).lower(state, frozen, batches[0]).compile()
    compile_s = time.perf_counter() - tick
    buffers = compiled.memory_analysis()
    _reset_peak_rss()
    state, metrics = compiled(state, frozen, batches[0])
    first_loss = float(metrics["loss"])

    def step(i: int) -> None:
        nonlocal state, metrics
        state, metrics = compiled(state, frozen, batches[i])
        jax.block_until_ready(metrics)

    times = _timed(step, args.steps)
    memory = _memory(base)
    return dict(device=f"{device.platform}: {device.device_kind}", **times, compile_s=compile_s, flops=flops,
                xla_flops=_xla_flops(compiled), eval_loss=eval_loss, first_loss=first_loss,
                last_loss=float(metrics["loss"]), trainable=counts[0], frozen=counts[1], **memory,
                **({} if args.skip_floors else dict(matmul_gflops=matmul_gflops(), kernel_s=kernel_seconds(matmuls))),
                xla_argument_mib=buffers.argument_size_in_bytes / 2 ** 20,
                xla_temp_mib=buffers.temp_size_in_bytes / 2 ** 20)


def run_torch(args: argparse.Namespace) -> dict[str, Any]:
    """`transformers`' Blip2ForConditionalGeneration with the stage-2 split on the saved weights."""
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    base = _status_mib("VmRSS")
    q = NUM_QUERY_TOKENS

    def inputs(b: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """[<image>]*Q + text, as the BLIP-2 processor builds it; the loss skips the image rows."""
        n = b["text_ids"].shape[0]
        return dict(pixel_values=torch.from_numpy(np.ascontiguousarray(b["image"].transpose(0, 3, 1, 2))),
                    input_ids=torch.from_numpy(np.concatenate([np.full((n, q), IMAGE_TOKEN_INDEX), b["text_ids"]],
                                                              1).astype(np.int64)),
                    attention_mask=torch.from_numpy(np.concatenate([np.ones((n, q)), b["text_mask"]], 1)
                                                    .astype(np.int64)),
                    labels=torch.from_numpy(np.concatenate([np.full((n, q), -100), b["labels"]], 1).astype(np.int64)))

    batches = [inputs(b) for b in _batches(args)]
    model = transformers.Blip2ForConditionalGeneration.from_pretrained(args.weights, dtype=torch.float32)
    model.vision_model.requires_grad_(False)
    model.vision_model.post_layernorm.requires_grad_(True)
    model.language_model.requires_grad_(False)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.ndim != 1 and not n.endswith(".bias")]  # LAVIS's rule, as ours
    rest = [p for n, p in named if p.ndim == 1 or n.endswith(".bias")]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=WEIGHT_DECAY), dict(params=rest, weight_decay=0.0)],
                            lr=LR, betas=BETAS, eps=EPS)
    model.eval()
    with torch.no_grad():
        eval_loss = float(model(**batches[0]).loss)
    model.train()
    trainable = sum(p.numel() for _, p in named)
    frozen = sum(p.numel() for p in model.parameters()) - trainable

    def step(i: int) -> float:
        loss = model(**batches[i]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    _reset_peak_rss()
    first_loss = step(0)
    losses = []
    times = _timed(lambda i: losses.append(step(i)), args.steps)
    return dict(device=f"cpu: {torch.get_num_threads()} threads", **times, eval_loss=eval_loss,
                first_loss=first_loss, last_loss=losses[-1], trainable=trainable, frozen=frozen, **_memory(base))


def _child(framework: str, args: argparse.Namespace, weights: str = "", floors: bool = True) -> dict[str, Any]:
    """Run this file as `--framework framework` and return its result line (`floors`: the jax child
    also measures the matmul rate and the XLA-kernel floor, ~1 min)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--framework", framework, "--weights", weights,
           "--steps", str(args.steps), "--batch", str(args.batch), "--text-length", str(args.text_length)]
    cmd += [] if floors else ["--skip-floors"]
    tick = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise RuntimeError(f"the {framework} child failed (exit {proc.returncode})")
    return dict(json.loads(lines[-1][len(RESULT):]), wall_s=time.perf_counter() - tick)


def parent(args: argparse.Namespace) -> None:
    import jax
    import torch
    import transformers

    load_before = os.getloadavg()
    start = datetime.datetime.now().astimezone()
    with tempfile.TemporaryDirectory(prefix="blip2_bench_") as weights:
        save_weights(weights)
        rounds = [(_child("torch", args, weights), _child("jax", args, weights, floors=r == 0))
                  for r in range(args.rounds)]
    load_after = os.getloadavg()
    # Round 0 reports memory, losses and floors; the step rows pool every round's steps.
    theirs, ours = ({**runs[0], **{key: [x for run in runs for x in run[key]] for key in ("times", "cpu_times")},
                     "load": max(run["load"] for run in runs)} for runs in zip(*rounds))

    t_ours, t_theirs = statistics.median(ours["times"]), statistics.median(theirs["times"])
    c_ours, c_theirs = statistics.median(ours["cpu_times"]), statistics.median(theirs["cpu_times"])
    rate = ours["matmul_gflops"]
    floor = ours["flops"] / (rate * 1e9)
    # The children's own threads add about one per core to the load average.
    loaded = max(load_before[0], ours["load"], theirs["load"]) > os.cpu_count() + 1
    print(f"BLIP-2 stage-2 OPT training step: blip2_jax (jax {jax.__version__}) vs transformers "
          f"{transformers.__version__} (torch {torch.__version__})")
    print(f"  {start:%Y-%m-%d %H:%M %Z}; {cpu_name()}, {os.cpu_count()} cores; load average (1/5/15 min) "
          f"{load_average(load_before)} before, {load_average(load_after)} after"
          + (": other work shares the cores, timings are noisy" if loaded else ""))
    print(f"  ViT-B/16 224 px (EVA-style, qkv bias) + BERT-base Q-Former ({NUM_QUERY_TOKENS} queries) + "
          f"OPT-125m-sized LM; batch {args.batch}, text {args.text_length} tokens; fp32, dropout on, AdamW; "
          f"median of {args.steps} steps after 1 warm-up step" + (
              f", in each of {args.rounds} rounds of the two children in turn, pooled" if args.rounds > 1 else ""))
    if not ours["device"].startswith("cpu"):
        print("  ours runs on an accelerator and theirs on the CPU: the rows below compare different devices, "
              "and memory is host RSS")
    print(row("", "ours (JAX)", "transformers (torch)", "torch / ours"))
    print(row("device", ours["device"], theirs["device"]))
    print(row("step time, median (s)", f"{t_ours:.3f}", f"{t_theirs:.3f}", f"{t_theirs / t_ours:.2f}x"))
    print(row("step time, min-max (s)", f"{min(ours['times']):.3f}-{max(ours['times']):.3f}",
               f"{min(theirs['times']):.3f}-{max(theirs['times']):.3f}"))
    if args.rounds > 1:
        per_round = [[statistics.median(run["times"]) for run in runs] for runs in zip(*rounds)]
        print(row("  median of each round (s)", " ".join(f"{t:.2f}" for t in per_round[1]),
                  " ".join(f"{t:.2f}" for t in per_round[0])))
    print(row("1-min load average after steps", f"{ours['load']:.2f}", f"{theirs['load']:.2f}"))
    print(row("step CPU time, median (s)", f"{c_ours:.3f}", f"{c_theirs:.3f}", f"{c_theirs / c_ours:.2f}x"))
    for name, key in (("peak memory (MiB)", "peak_mib"), ("  during steps (MiB)", "step_peak_mib")):
        print(row(name, f"{ours[key]:.0f}", f"{theirs[key]:.0f}", f"{theirs[key] / ours[key]:.2f}x"))
    print(f"  XLA buffers of our step: arguments {ours['xla_argument_mib']:.0f} MiB (state donated) + "
          f"temporaries {ours['xla_temp_mib']:.0f} MiB")
    print(row("trainable / frozen params (M)", f"{ours['trainable'] / 1e6:.1f} / {ours['frozen'] / 1e6:.1f}",
               f"{theirs['trainable'] / 1e6:.1f} / {theirs['frozen'] / 1e6:.1f}"))
    print(row("eval loss, batch 0", f"{ours['eval_loss']:.6f}", f"{theirs['eval_loss']:.6f}",
               f"|d| {abs(ours['eval_loss'] - theirs['eval_loss']):.1e}"))
    print(row("train loss, first / last", f"{ours['first_loss']:.4f} / {ours['last_loss']:.4f}",
               f"{theirs['first_loss']:.4f} / {theirs['last_loss']:.4f}"))
    print(row("compile (s)", f"{ours['compile_s']:.1f}", "-"))
    print(row("child process wall (s)", f"{ours['wall_s']:.0f}", f"{theirs['wall_s']:.0f}"))
    print(f"  our step: {ours['flops'] / 1e9:.1f} GFLOP of matmuls (jaxpr, scans x length); XLA cost analysis "
          f"says {ours['xla_flops'] / 1e9:.1f} GFLOP (each scanned layer stack once)")
    print(f"  fp32 matmul 2048^3 (ours' process, after its steps): {rate:.1f} GFLOP/s (best of 5) -> floor "
          f"{floor:.2f} s; ours / floor {t_ours / floor:.2f}, torch / floor {t_theirs / floor:.2f} (the most any step "
          "could gain over torch here)")
    kernel_s = ours["kernel_s"]
    print(f"  XLA's kernels: the step's matmuls, each form jitted alone (common.kernel_seconds), {kernel_s:.2f} s "
          f"({ours['flops'] / kernel_s / 1e9:.0f} GFLOP/s); ours / that {t_ours / kernel_s:.2f}, torch / that "
          f"{t_theirs / kernel_s:.2f} (the most a step on XLA's kernels could gain over torch here)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per framework (after 1 warm-up step)")
    parser.add_argument("--batch", type=int, default=8, help="stage-2 batch size")
    parser.add_argument("--text-length", type=int, default=32, help="text tokens per example (after the queries)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the torch and jax children in turn this many times and pool their steps: on "
                             "a shared machine PyTorch's step moves by up to a third from one run to the next")
    parser.add_argument("--framework", choices=("jax", "torch"), default=None,
                        help="internal: run one side in this process and print its result line")
    parser.add_argument("--weights", default="", help="internal: the saved weights the children load")
    parser.add_argument("--skip-floors", action="store_true",
                        help="internal: the jax child leaves out the matmul rate and the XLA-kernel floor")
    args = parser.parse_args()
    if args.rounds < 1 or args.steps < 1:
        parser.error(f"--rounds and --steps must be >= 1, got --rounds {args.rounds} --steps {args.steps}")
    if args.framework is None:
        parent(args)
        return
    run = {"jax": run_jax, "torch": run_torch}[args.framework]
    print(RESULT + json.dumps(run(args)), flush=True)


if __name__ == "__main__":
    main()
