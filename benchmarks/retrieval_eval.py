"""Retrieval evaluation (LAVIS `compute_sim_matrix`, spec §8): blip2_jax against a PyTorch re-rank, wall time.

    python benchmarks/retrieval_eval.py                  # ~3 min on 2 idle cores
    python benchmarks/retrieval_eval.py --devices 8      # also ours on 8 simulated CPU devices: ~5 min

What it measures: the whole retrieval evaluation of `--images` N images against 5N captions (ITC
similarities of every pair, then each image's and each text's `--k_test` best re-scored by ITM) on a
random `transformers.Blip2ForImageTextRetrieval` with a ViT-B/16-sized EVA-style vision tower (224 px)
and a BERT-base Q-Former (32 queries), fp32. Both sides start from the same uint8 images and strings
and use the same preprocessing and tokenisation (`preprocess_images`, `qformer_text`), inside the time.
  ours:   `blip2_jax.evaluate.retrieval.retrieval_scores`, timed on its first call (tracing and XLA
          compilation included; the compile share is read from JAX's compile events) and on a second call.
  theirs: `tests/reference/retrieval.py`, the same algorithm on the `transformers` model's submodules.
The ITM re-rank dominates (a 12-layer Q-Former pass over 32 queries + 35 tokens, ~15 GFLOP, per
pair; 6N x k_test pairs), so N and k_test are small by default (N=100 at k_test 16 is ~150 TFLOP, half
an hour per call here); LAVIS evaluates 5k images at k_test 128 on GPUs. Ours scores a pair that is
in both top-k lists once, the reference (like LAVIS) twice.
The `R@1` rows check that the two give the same ranking (random weights: near-chance values).
Timings share the machine with whatever else runs; the load average is printed.
"""
# pylint: disable=import-outside-toplevel
from __future__ import annotations

import argparse
import collections
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import NUM_QUERY_TOKENS, QFORMER, VISION, cpu_name, load_average, row

CAPTIONS_PER_IMAGE = 5
BERT_VOCAB = 30522  # bert-base-uncased; [DEC] is added on top (Q-Former vocabulary 30523)
WORDS = [f"w{i}" for i in range(BERT_VOCAB - 5)]


def save_model(directory: Path) -> None:
    """A random retrieval model of the benchmark's sizes and a BERT-sized vocab.txt."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.Blip2Config(
        vision_config=VISION, qformer_config=dict(QFORMER, vocab_size=BERT_VOCAB + 1, use_qformer_text_input=True),
        num_query_tokens=NUM_QUERY_TOKENS, image_text_hidden_size=256, image_token_index=None)
    transformers.Blip2ForImageTextRetrieval(config).save_pretrained(directory)
    (directory / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")


def make_data(num_images: int) -> tuple[list[np.ndarray], list[str]]:
    rng = np.random.default_rng(0)
    size = VISION["image_size"]
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(num_images)]
    texts = [" ".join(rng.choice(WORDS, rng.integers(5, 21))) for _ in range(CAPTIONS_PER_IMAGE * num_images)]
    return images, texts


def run_torch(directory: Path, images, texts, args: argparse.Namespace, threads: int) -> dict:
    import torch
    import transformers

    from blip2_jax.data.images import preprocess_images
    from blip2_jax.data.tokenizers import qformer_text, qformer_tokenizer
    from blip2_jax.evaluate.retrieval import TEXT_LENGTH
    from tests.reference.retrieval import retrieval_scores

    torch.set_num_threads(threads)
    model = transformers.Blip2ForImageTextRetrieval.from_pretrained(directory, dtype=torch.float32).eval()
    tokenizer = qformer_tokenizer(directory)
    tick = time.perf_counter()
    pixels = np.ascontiguousarray(preprocess_images(images, VISION["image_size"]).transpose(0, 3, 1, 2))
    tokens = [qformer_text(tokenizer, t, TEXT_LENGTH) for t in texts]
    ids, mask = (np.stack([t[k] for t in tokens]) for k in ("text_ids", "text_mask"))
    sims, i2t, t2i = retrieval_scores(model, pixels, ids, mask, k_test=args.k_test, batch_size=args.batch)
    return dict(time=time.perf_counter() - tick, sims=sims, i2t=i2t, t2i=t2i, device=f"cpu: {threads} threads")


def run_jax(directory: Path, images, texts, args: argparse.Namespace, devices: int) -> dict:
    """Two calls of `retrieval_scores` on a mesh of `devices`: the first compiles."""
    import jax
    import jax.monitoring

    from blip2_jax.data.tokenizers import qformer_tokenizer
    from blip2_jax.evaluate.model import load_model
    from blip2_jax.evaluate.retrieval import retrieval_scores
    from blip2_jax.parallel.mesh import make_mesh

    compile_s = collections.Counter()

    def listen(event: str, seconds: float, **_) -> None:
        if event.startswith("/jax/core/compile/"):
            compile_s["total"] += seconds

    jax.monitoring.register_event_duration_secs_listener(listen)
    mesh = make_mesh(devices=jax.devices()[:devices])
    model, tokenizer = load_model(directory, mesh), qformer_tokenizer(directory)
    out = dict(times=[], compile=[], device=f"{jax.devices()[0].platform}: {devices} device(s)")
    for _ in range(2):
        compile_s.clear()
        tick = time.perf_counter()
        scores = retrieval_scores(model, mesh, images, texts, tokenizer, k_test=args.k_test,
                                  batch_size=max(1, args.batch // devices))
        out["times"].append(time.perf_counter() - tick)
        out["compile"].append(compile_s["total"])
    jax.monitoring.clear_event_listeners()
    return dict(out, sims=scores.sims, i2t=scores.i2t, t2i=scores.t2i)


def recall_at_1(i2t: np.ndarray, t2i: np.ndarray) -> tuple[float, float]:
    """(text R@1, image R@1) in percent, caption t being image t // 5's."""
    from blip2_jax.evaluate.metrics import retrieval_metrics

    n = len(i2t)
    img2txt = [list(range(CAPTIONS_PER_IMAGE * i, CAPTIONS_PER_IMAGE * (i + 1))) for i in range(n)]
    metrics = retrieval_metrics(i2t, t2i, img2txt, np.arange(CAPTIONS_PER_IMAGE * n) // CAPTIONS_PER_IMAGE)
    return metrics["txt_r1"], metrics["img_r1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16, help=f"images N ({CAPTIONS_PER_IMAGE}N captions)")
    parser.add_argument("--k_test", type=int, default=2, help="texts per image and images per text re-ranked")
    parser.add_argument("--batch", type=int, default=8, help="images, texts or pairs per forward pass (global)")
    parser.add_argument("--devices", type=int, default=1, help="also run ours on this many simulated CPU devices")
    args = parser.parse_args()
    if args.devices > 1:  # before JAX initialises
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} " \
                                  f"--xla_force_host_platform_device_count={args.devices}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.reference
    import jax
    import torch
    import transformers

    threads = os.cpu_count()  # XLA's CPU client runs on every core, so torch gets them all too
    load_before = os.getloadavg()
    start = datetime.datetime.now().astimezone()
    images, texts = make_data(args.images)
    with tempfile.TemporaryDirectory(prefix="blip2_bench_") as directory:
        save_model(Path(directory))
        theirs = run_torch(Path(directory), images, texts, args, threads)
        ours = {n: run_jax(Path(directory), images, texts, args, n) for n in sorted({1, args.devices})}
    load_after = os.getloadavg()

    pairs = CAPTIONS_PER_IMAGE * args.images ** 2
    reranked = len(images) * min(args.k_test, len(texts)) + len(texts) * min(args.k_test, len(images))
    print(f"BLIP-2 retrieval evaluation: blip2_jax (jax {jax.__version__}) vs a PyTorch re-rank on transformers "
          f"{transformers.__version__} (torch {torch.__version__})")
    print(f"  {start:%Y-%m-%d %H:%M %Z}; {cpu_name()}, {os.cpu_count()} cores; load average (1/5/15 min) "
          f"{load_average(load_before)} before, {load_average(load_after)} after")
    print(f"  ViT-B/16 224 px + BERT-base Q-Former ({NUM_QUERY_TOKENS} queries), fp32; {args.images} images x "
          f"{len(texts)} texts = {pairs} ITC pairs, k_test {args.k_test}: {reranked} ITM pairs (i2t + t2i); "
          f"batch {args.batch}; torch.set_num_threads({threads}) = the cores JAX's CPU client uses")
    print(row("", "ours (JAX)", "reference (torch)", "torch / ours"))
    t_theirs = theirs["time"]
    for n, run in ours.items():
        first, warm = run["times"]
        print(row(f"[{n} device(s)] first call (s)", f"{first:.1f}", f"{t_theirs:.1f}", f"{t_theirs / first:.2f}x"))
        print(row("  of which compiling (s)", f"{run['compile'][0]:.1f}", "-"))
        print(row("  second call (s)", f"{warm:.1f}", f"{t_theirs:.1f}", f"{t_theirs / warm:.2f}x"))
        print(row("  of which compiling (s)", f"{run['compile'][1]:.1f}", "-"))
    r1_theirs = recall_at_1(theirs["i2t"], theirs["t2i"])
    for n, run in ours.items():
        r1 = recall_at_1(run["i2t"], run["t2i"])
        same = np.array_equal(run["i2t"] == -100, theirs["i2t"] == -100) and \
            np.array_equal(run["t2i"] == -100, theirs["t2i"] == -100)
        diff = max(np.abs(run[k] - theirs[k]).max() for k in ("sims", "i2t", "t2i"))
        print(row(f"[{n} device(s)] text/image R@1 %", f"{r1[0]:.2f}/{r1[1]:.2f}", f"{r1_theirs[0]:.2f}/"
                  f"{r1_theirs[1]:.2f}", "same" if r1 == r1_theirs else "DIFFERENT"))
        unique = int(((run["i2t"] != -100) | (run["t2i"].T != -100)).sum())
        print(f"  [{n} device(s)] same re-ranked pairs: {same} ({unique} distinct pairs scored by ours); "
              f"max |ours - torch| over sims, i2t, t2i: {diff:.2e}")
    if len(ours) > 1:  # the same global batch, so per-device shapes differ: equal to rounding, not bit for bit
        a, b = ours.values()
        diff = max(np.abs(a[k] - b[k]).max() for k in ("sims", "i2t", "t2i"))
        print(f"  1 vs {args.devices} devices (per-device batch {args.batch} vs {max(1, args.batch // args.devices)}):"
              f" max |difference| {diff:.2e}")


if __name__ == "__main__":
    main()
