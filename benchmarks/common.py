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

import numpy as np

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
    import jax

    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(reps):
        tick = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - tick)
    return best


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    """Best-of-`reps` fp32 rate of a jitted n^3 `jnp.dot`, GFLOP/s."""
    import jax
    import jax.numpy as jnp

    a, b = jax.random.normal(jax.random.PRNGKey(0), (2, n, n), jnp.float32)
    return 2 * n ** 3 / best_seconds(jax.jit(jnp.dot), a, b, reps=reps) / 1e9


def _matmul_forms(eqn) -> list[tuple[tuple, int | None]]:
    """How to time one equation, as (operand shapes, the weight's contracting axis): a dot as a
    (batch, M, K) by (batch, K, N) product and by (batch, N, K), the two layouts a weight can be
    stored in; a convolution as it is (axis None)."""
    if eqn.primitive.name != "dot_general":
        return [(tuple(v.aval.shape for v in eqn.invars), None)]
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = (v.aval.shape for v in eqn.invars)

    def size(shape: tuple, dims) -> int:
        return int(np.prod([shape[d] for d in dims]))

    b, k = size(lhs, lb), size(lhs, lc)
    m = size(lhs, [d for d in range(len(lhs)) if d not in lc + lb])
    n = size(rhs, [d for d in range(len(rhs)) if d not in rc + rb])
    return [(((b, m, k), (b, k, n)), 1), (((b, m, k), (b, n, k)), 2)]


def kernel_seconds(equations, budget: int = 256 * 2 ** 20) -> float:
    """Seconds the matrix work takes on XLA's own kernels, every other operation free.

    `equations` are (equation, count) pairs (`blip2_jax.train.flops.matmul_equations`). Each
    distinct form is timed jitted, as the work runs it: up to `count` calls in one program, each on
    its own copy of the second operand (the weight) and together up to `budget` bytes of them, so
    that weights stream from memory as a decoding step's ~500 MB do rather than sit in cache; best
    of enough runs to fill ~0.5 s. A dot runs as a plain (batched) M x K by K x N product in
    whichever weight layout is faster (in place, XLA folds transposes and reshapes into a dot that
    an isolated copy of the equation would pay for)."""
    import jax

    forms: dict = {}  # (primitive, shapes, axis, dtype) -> (an equation, its count, [indices into equations])
    for index, (eqn, count) in enumerate(equations):
        for shapes, axis in _matmul_forms(eqn):
            key = (eqn.primitive.name, shapes, axis, str(eqn.invars[0].aval.dtype))
            _, most, indices = forms.setdefault(key, (eqn, 0, []))
            forms[key] = (eqn, max(most, count), indices + [index])
    best = [float("inf")] * len(equations)
    for (_, shapes, axis, dtype), (eqn, count, indices) in forms.items():
        copies = int(np.clip(budget // (np.prod(shapes[1]) * np.dtype(dtype).itemsize), 1, count))
        first, weight = (jax.random.normal(jax.random.PRNGKey(i), shape, dtype) for i, shape in enumerate(shapes))
        weights = [weight + i for i in range(copies)]
        if axis is None:
            run = jax.jit(lambda x, *ws, eqn=eqn: [eqn.primitive.bind(x, w, **eqn.params) for w in ws])
        else:
            dims = (((2,), (axis,)), ((0,), (0,)))
            run = jax.jit(lambda x, *ws, dims=dims: [jax.lax.dot_general(x, w, dims) for w in ws])
        once = best_seconds(run, first, *weights, reps=1)
        seconds = best_seconds(run, first, *weights, reps=int(np.clip(0.5 / once, 3, 50))) / copies
        for index in indices:
            best[index] = min(best[index], seconds)
    return sum(count * seconds for (_, count), seconds in zip(equations, best))


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def load_average(load: tuple[float, float, float]) -> str:
    return "/".join(f"{x:.2f}" for x in load)


def row(name: str, ours: str, theirs: str, ratio: str = "") -> str:
    return f"  {name:<30}{ours:>16}{theirs:>22}{ratio:>16}"
