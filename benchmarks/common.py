"""What the benchmarks share: the BLIP-2 sizes they compare at and how they report.

Sizes: a ViT-B/16-sized EVA-style vision tower (224 px), a BERT-base Q-Former (32 queries) and an
OPT-125m-sized LM, saved once as a random `transformers` checkpoint that both frameworks load.
"""
# Frameworks are imported inside the functions that use them (a child pays only for its own).
# pylint: disable=import-outside-toplevel
from __future__ import annotations

import platform
import time
from pathlib import Path

NUM_QUERY_TOKENS = 32
IMAGE_TOKEN_INDEX = 50265  # OPT's <image> id in the BLIP-2 checkpoints; text ids are drawn below it
VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=16,
              image_size=224, qkv_bias=True)
QFORMER = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
               cross_attention_frequency=2, encoder_hidden_size=768)
OPT_125M = dict(model_type="opt", vocab_size=50272, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                ffn_dim=3072, max_position_embeddings=2048, word_embed_proj_dim=768)


def save_weights(directory: str) -> None:
    """A random `transformers` model of the benchmark's sizes, saved for both children to load."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config=OPT_125M,
                                      num_query_tokens=NUM_QUERY_TOKENS, image_token_index=IMAGE_TOKEN_INDEX)
    transformers.Blip2ForConditionalGeneration(config).save_pretrained(directory)


def best_seconds(fn, *args, reps: int = 5) -> float:
    """Best of `reps` timed calls of the jitted `fn` after one warm-up call."""
    fn(*args).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        tick = time.perf_counter()
        fn(*args).block_until_ready()
        best = min(best, time.perf_counter() - tick)
    return best


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    """Best-of-`reps` fp32 rate of a jitted n^3 `jnp.dot`, GFLOP/s."""
    import jax
    import jax.numpy as jnp

    a, b = jax.random.normal(jax.random.PRNGKey(0), (2, n, n), jnp.float32)
    return 2 * n ** 3 / best_seconds(jax.jit(jnp.dot), a, b, reps=reps) / 1e9


def kernel_seconds(equations, reps: int = 5) -> float:
    """Seconds the matrix work takes when every distinct dot and convolution in `equations`
    ((equation, count) pairs, `blip2_jax.train.flops.matmul_equations`) runs alone, jitted and hot
    (best of `reps`), times its count: the least time XLA's own kernels need for that work here, with
    every other operation free. Shapes with few rows run below the 2048^3 rate, so this floor is the
    one an implementation on XLA can approach."""
    import jax

    distinct: dict = {}
    for eqn, count in equations:
        key = (eqn.primitive.name, tuple((v.aval.shape, str(v.aval.dtype)) for v in eqn.invars),
               repr(sorted(eqn.params.items())))
        distinct[key] = (eqn, distinct.get(key, (eqn, 0))[1] + count)
    total = 0.0
    for eqn, count in distinct.values():
        keys = jax.random.split(jax.random.PRNGKey(0), len(eqn.invars))
        operands = [jax.random.normal(k, v.aval.shape, v.aval.dtype) for k, v in zip(keys, eqn.invars)]
        run = jax.jit(lambda *xs, eqn=eqn: eqn.primitive.bind(*xs, **eqn.params))
        total += count * best_seconds(run, *operands, reps=reps)
    return total


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def load_average(load: tuple[float, float, float]) -> str:
    return "/".join(f"{x:.2f}" for x in load)


def row(name: str, ours: str, theirs: str, ratio: str = "") -> str:
    return f"  {name:<30}{ours:>16}{theirs:>22}{ratio:>16}"
