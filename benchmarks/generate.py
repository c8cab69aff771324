"""Batched beam-search captioning: blip2_jax against `transformers.generate`, captions per second.

    python benchmarks/generate.py              # 3 timed runs per framework: ~3 min on 2 idle cores
    python benchmarks/generate.py --runs 1

What it measures: captioning a batch of `--batch` images with beam search (`--beams` beams,
exactly `--new-tokens` new tokens: EOS is never chosen by these random weights, checked below) on a
ViT-B/16-sized EVA-style vision tower, a BERT-base Q-Former and an OPT-125m-sized LM, fp32, the
prompt being the 32 image queries and BOS (`transformers`' default when no text is given).
  ours:   `blip2_jax.generation.decode.generate_fn`, one jitted call (compile reported apart).
  theirs: `transformers.Blip2ForConditionalGeneration.generate` with the same settings.
Both load one random `transformers` model from a temporary directory and caption the same images;
the `same ids` row says how many of the returned captions agree token for token.

The floor is the matrix FLOPs of the work (vision tower and Q-Former once per image, the LLM
prompt once per image, then one decoding step per new token for every beam; counted from the
jaxprs of our pieces) over this machine's fp32 matmul rate (best jitted 2048^3 `jnp.dot`), the
least time any implementation could take here. Matmuls with few rows (a decoding step's 40) run
well below that rate, so a second floor times the same matmuls on XLA's own kernels: each distinct
dot and convolution jitted alone, its weights streamed from memory, times how often the work runs
it (`common.kernel_seconds`): the least time an implementation built on XLA could take with
everything else free, so `torch / that` is the most such an implementation could gain here.
Timings share the machine with whatever else runs; the load average is printed, and the ratio
means something only from a quiet run.
"""
# pylint: disable=import-outside-toplevel
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time

import numpy as np

from common import IMAGE_TOKEN_INDEX, NUM_QUERY_TOKENS, VISION, cpu_name, kernel_seconds, load_average, \
    matmul_gflops, row, save_weights


def _timed(run, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        tick = time.perf_counter()
        run()
        times.append(time.perf_counter() - tick)
    return times


def _prompt(batch: int, bos: int) -> np.ndarray:
    return np.array([[IMAGE_TOKEN_INDEX] * NUM_QUERY_TOKENS + [bos]] * batch, np.int64)


def run_torch(weights: str, images: np.ndarray, args: argparse.Namespace) -> dict:
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    model = transformers.Blip2ForConditionalGeneration.from_pretrained(weights, dtype=torch.float32).eval()
    ids = torch.from_numpy(_prompt(len(images), model.config.text_config.bos_token_id))
    pixels = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    out = {}

    @torch.no_grad()
    def run():
        out["ids"] = model.generate(pixel_values=pixels, input_ids=ids, attention_mask=torch.ones_like(ids),
                                    num_beams=args.beams, max_new_tokens=args.new_tokens, do_sample=False)

    run()  # warm-up
    times = _timed(run, args.runs)
    return dict(times=times, tokens=out["ids"][:, ids.shape[1]:].numpy(), device=f"cpu: {torch.get_num_threads()} "
                "threads")


def run_jax(weights: str, images: np.ndarray, args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp

    from blip2_jax.generation.config import GenerationConfig
    from blip2_jax.generation.decode import decoding_params, generate_fn
    from blip2_jax.models.blip2 import Blip2ForConditionalGeneration
    from blip2_jax.train.flops import equations_flops
    from blip2_jax.weights.hf_checkpoint import load_pretrained

    cfg, params = load_pretrained(weights)
    model = Blip2ForConditionalGeneration(cfg)
    params = decoding_params(model, params)  # on the device, in the decoding layout, as `Blip2Generator` holds them
    ids = jnp.asarray(_prompt(len(images), cfg.text.bos_token_id))
    mask, pixels = jnp.ones_like(ids), jnp.asarray(images)
    fn = generate_fn(model, GenerationConfig(num_beams=args.beams, max_new_tokens=args.new_tokens))
    tick = time.perf_counter()
    compiled = fn.lower(params, pixels, ids, mask).compile()
    compile_s = time.perf_counter() - tick
    out = {}

    def run():
        out["result"] = jax.block_until_ready(compiled(params, pixels, ids, mask))

    run()
    times = _timed(run, args.runs)
    work = _work(model, params, pixels, ids, args)
    flops = {part: equations_flops(eqns) for part, eqns in work.items()}
    device = jax.devices()[0]
    return dict(times=times, tokens=np.asarray(out["result"].tokens[:, 0]), compile_s=compile_s, flops=flops,
                device=f"{device.platform}: {device.device_kind}", matmul_gflops=matmul_gflops(),
                kernel_s={part: kernel_seconds(eqns) for part, eqns in work.items()})


def _work(model, params, pixels, ids, args) -> dict[str, list]:
    """The necessary matrix work, part by part, as (equation, count) pairs from the jaxprs of the
    model's pieces (`flops.matmul_equations`)."""
    import jax
    import jax.numpy as jnp

    from blip2_jax.models.attention import cache_shape
    from blip2_jax.train.flops import matmul_equations

    b, t = ids.shape
    n = b * args.beams
    model = model.clone(scan_lm_layers=False)  # the layout of `params` (decoding_params)
    variables = {"params": params}

    def visual(p, x):
        return model.apply({"params": p}, x, method=lambda m, x: m.language_inputs(m.query_features(
            m.encode_image(x))))

    def llm(p, embeds, cache, index):
        return model.apply({"params": p}, embeds, jnp.ones(cache_shape(cache), jnp.int32),
                           position_ids=jnp.zeros(embeds.shape[:2], jnp.int32) + index, cache=cache,
                           cache_index=index, logits_from=embeds.shape[1] - 1,
                           method=lambda m, *a, **k: m.language_model(*a, **k))

    def equations(fn, *inputs, times=1):
        return [(eqn, count * times) for eqn, count in matmul_equations(jax.make_jaxpr(fn)(*inputs).jaxpr)]

    width, length = model.config.text.hidden_size, t + args.new_tokens
    cache = model.apply(variables, b, length, method=lambda m, *a: m.language_model.init_cache(*a))
    step_cache = model.apply(variables, n, length, method=lambda m, *a: m.language_model.init_cache(*a))
    return dict(visual=equations(visual, params, pixels),
                prompt=equations(llm, params, jnp.zeros((b, t, width)), cache, 0),
                decode=equations(llm, params, jnp.zeros((n, 1, width)), step_cache, t, times=args.new_tokens - 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per framework (after one warm-up run)")
    parser.add_argument("--batch", type=int, default=8, help="images per batch")
    parser.add_argument("--beams", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=20)
    args = parser.parse_args()
    import jax
    import torch
    import transformers

    load_before = os.getloadavg()
    start = datetime.datetime.now().astimezone()
    images = np.random.default_rng(0).standard_normal(
        (args.batch, VISION["image_size"], VISION["image_size"], 3)).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="blip2_bench_") as weights:
        save_weights(weights)
        theirs = run_torch(weights, images, args)
        ours = run_jax(weights, images, args)
    load_after = os.getloadavg()

    t_ours, t_theirs = statistics.median(ours["times"]), statistics.median(theirs["times"])
    flops = sum(ours["flops"].values())
    floor = flops / (ours["matmul_gflops"] * 1e9)
    same = sum(a.tolist() == b.tolist() for a, b in zip(ours["tokens"], theirs["tokens"]))
    lengths = sorted({ours["tokens"].shape[1], theirs["tokens"].shape[1]})
    print(f"BLIP-2 beam-search captioning: blip2_jax (jax {jax.__version__}) vs transformers "
          f"{transformers.__version__} (torch {torch.__version__})")
    print(f"  {start:%Y-%m-%d %H:%M %Z}; {cpu_name()}, {os.cpu_count()} cores; load average (1/5/15 min) "
          f"{load_average(load_before)} before, {load_average(load_after)} after")
    print(f"  ViT-B/16 224 px + BERT-base Q-Former ({NUM_QUERY_TOKENS} queries) + OPT-125m-sized LM; batch "
          f"{args.batch}, {args.beams} beams, {args.new_tokens} new tokens, fp32; median of {args.runs} runs")
    print(row("", "ours (JAX)", "transformers (torch)", "torch / ours"))
    print(row("device", ours["device"], theirs["device"]))
    print(row("batch time, median (s)", f"{t_ours:.3f}", f"{t_theirs:.3f}", f"{t_theirs / t_ours:.2f}x"))
    print(row("batch time, min-max (s)", f"{min(ours['times']):.3f}-{max(ours['times']):.3f}",
              f"{min(theirs['times']):.3f}-{max(theirs['times']):.3f}"))
    print(row("captions / s", f"{args.batch / t_ours:.2f}", f"{args.batch / t_theirs:.2f}"))
    print(row("compile (s)", f"{ours['compile_s']:.1f}", "-"))
    print(f"  same ids: {same} of {args.batch} captions; generated lengths {lengths}")
    parts = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in ours["flops"].items())
    print(f"  work: {flops / 1e9:.1f} GFLOP of matmuls ({parts}); fp32 matmul 2048^3: "
          f"{ours['matmul_gflops']:.1f} GFLOP/s -> floor {floor:.2f} s; ours / floor {t_ours / floor:.2f}, "
          f"torch / floor {t_theirs / floor:.2f} (the most any implementation could gain over torch here)")
    kernel_s = sum(ours["kernel_s"].values())
    parts = ", ".join(f"{k} {v:.2f}" for k, v in ours["kernel_s"].items())
    print(f"  XLA's kernels: the same matmuls, each form jitted alone (common.kernel_seconds), {kernel_s:.2f} s "
          f"({parts}; {flops / kernel_s / 1e9:.0f} GFLOP/s); ours / that {t_ours / kernel_s:.2f}, torch / that "
          f"{t_theirs / kernel_s:.2f} (the most an implementation on XLA's kernels could gain over torch here)")


if __name__ == "__main__":
    main()
