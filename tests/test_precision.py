"""bf16 compute against fp32 (design decision 6, issue 17 Done-when 4), on the tiny perturbed
`transformers` models of the parity tests loaded with fp32 parameters.

Each tower run with `dtype=bfloat16` stays within a stated relative error ||bf16 - fp32|| / ||fp32||
of the same tower in fp32, on the same fp32 inputs. bf16 keeps 8 significant bits: one rounding
moves a value by up to EPS = 2^-8 relative (2^-9 to nearest), and every matmul rounds both its
activations and its weights. The tolerances count roundings in series:
- Q-Former features (query and text rows): 2 EPS. Its residual stream and LayerNorms stay fp32,
  so only the matmul operands are rounded (measured 0.0023-0.0029 over 5 seeds; 0.0056 for the
  query rows when the stream was bf16).
- ITM logits: 4 EPS. The two-way head gives 2 numbers per pair, small next to the features they
  are read from, so their relative error spreads wider (0.0017-0.0086 over 5 seeds).
- ViT and OPT: 4 EPS. Their residual stream is bf16 (as in LAVIS, which runs both frozen towers
  in fp16), so each of their sublayers adds a rounding of the stream (measured 0.0056-0.0066 and
  0.0053).
- T5: 8 EPS. Five blocks (2 encoder, 3 decoder with cross-attention) and unscaled attention
  logits, which turn a relative error of q and k into an absolute one in the softmax (measured
  0.015-0.021 over 5 seeds).
Each error must also exceed EPS / 16, so a tower that silently stayed in fp32 fails.

And the compiled bf16 Q-Former keeps its residual stream in fp32: every residual add and every
LayerNorm input is float32 while every matmul takes bf16 operands.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.extend import core as jax_core

from blip2_jax.models import blip2
from blip2_jax.models import config as config_lib
from blip2_jax.weights.hf_checkpoint import params_from_state_dict
from tests.reference import hf_models as ref

EPS = 2.0 ** -8
TOLERANCE = {"vit": 4 * EPS, "qformer_queries": 2 * EPS, "qformer_text": 2 * EPS, "itm": 4 * EPS,
             "opt": 4 * EPS, "t5": 8 * EPS}
B, Q, L = 3, ref.NUM_QUERY_TOKENS, 7


def _relative_error(low, full) -> float:
    low, full = np.asarray(low, np.float64), np.asarray(full, np.float64)
    return float(np.linalg.norm(low - full) / np.linalg.norm(full))


def _models(hf):
    """Our fp32 and bf16-compute models of `hf`, and their (shared, fp32) variables."""
    cfg = config_lib.from_hf(hf.config.to_dict())
    variables = {"params": params_from_state_dict(ref.state_dict(hf), cfg)}
    return blip2.build(cfg), blip2.build(cfg.replace(dtype="bfloat16")), variables


def _text():
    ids, mask = ref.padded_text([5, 3, 7], L, ref.QFORMER["vocab_size"], first=1, seed=7)
    return jnp.asarray(ids), jnp.asarray(mask)


def _run(model, variables, method, *args):
    return jax.jit(functools.partial(model.apply, method=method))(variables, *args)


def _retrieval_outputs(model, image, pixels, ids, mask) -> dict:
    """The ViT's features (from `pixels`) and the Q-Former's (from the same fp32 `image`)."""
    return {"vit": model.encode_image(pixels), "qformer_queries": model.query_features(image),
            "qformer_text": jnp.where(mask[..., None] == 1, model.text_hidden(ids, mask), 0),
            "itm": model.itm(image, ids, mask)}


@pytest.fixture(scope="module")
def errors():
    """Relative error of each tower's output in bf16 compute."""
    full, low, v = _models(ref.retrieval_model(seed=7))
    pixels = jnp.asarray(ref.nhwc(ref.pixels(B, seed=7)))
    ids, mask = _text()
    image = _run(full, v, full.encode_image, pixels)
    low_out, full_out = (_run(m, v, _retrieval_outputs, image, pixels, ids, mask) for m in (low, full))
    out = {name: (low_out[name], full_out[name]) for name in full_out}
    rng = np.random.default_rng(7)
    for kind, text in (("opt", ref.OPT), ("t5", ref.T5)):
        full, low, v = _models(ref.generation_model(text, seed=7))
        width = text.get("word_embed_proj_dim") or text["d_model"]
        embeds = jnp.asarray(rng.standard_normal((B, 12, width)).astype(np.float32))
        ones = jnp.ones((B, 12), jnp.int32)
        if kind == "opt":
            logits = lambda m, e, k: m.language_model(e, k)[0]  # noqa: E731
        else:
            decoder = jnp.asarray(rng.integers(0, text["vocab_size"], (B, 5)))
            logits = lambda m, e, k: m.language_model(e, k, decoder, jnp.ones_like(decoder))  # noqa: E731
        out[kind] = tuple(_run(m, v, logits, embeds, ones) for m in (low, full))
    return {name: _relative_error(*pair) for name, pair in out.items()}


@pytest.mark.parametrize("tower", list(TOLERANCE))
def test_bf16_tower_stays_near_fp32(errors, tower):
    assert EPS / 16 < errors[tower] <= TOLERANCE[tower], errors


def _equations(jaxpr: jax_core.Jaxpr):
    """Every equation of `jaxpr`, including those inside scans, remat and nested jits."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                if isinstance(sub, jax_core.ClosedJaxpr):
                    yield from _equations(sub.jaxpr)
                elif isinstance(sub, jax_core.Jaxpr):
                    yield from _equations(sub)


def test_bf16_qformer_keeps_its_residual_stream_in_fp32():
    """The joint ITM pass (queries and text, cross-attention, both feed-forwards) of a 3-layer
    Q-Former (a scanned group and a single-layer last group), traced as `jit` compiles it."""
    _, low, v = _models(ref.retrieval_model(seed=7, qformer_layers=3))
    ids, mask = _text()
    image = jnp.zeros((B, 226, ref.VISION["hidden_size"]), jnp.bfloat16)  # what the bf16 ViT gives
    norm_inputs = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.LayerNorm):
            norm_inputs["/".join(context.module.scope.path)] = args[0].dtype
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jaxpr = jax.make_jaxpr(lambda *a: low.apply(v, *a, method=low.itm))(image, ids, mask).jaxpr
    eqns = list(_equations(jaxpr))

    per_layer = ["attention/output", "crossattention/output", "output_query", "output"]
    expected = {"qformer/layernorm"} | {f"qformer/encoder/{group}/{name}/LayerNorm"
                                        for group in ("layers/layer_0", "remainder/layer_0") for name in per_layer}
    expected |= {f"qformer/encoder/layers/layer_1/{name}/LayerNorm" for name in per_layer if name[:5] != "cross"}
    assert norm_inputs.keys() == expected
    assert set(norm_inputs.values()) == {jnp.dtype(jnp.float32)}

    # residual adds: both operands are whole (B, rows, D) activations (bias adds broadcast a (1, 1, D))
    d = ref.QFORMER["hidden_size"]
    residual = [e for e in eqns if e.primitive.name == "add"
                and all(getattr(x.aval, "shape", ()) in {(B, Q + L, d), (B, Q, d), (B, L, d)} for x in e.invars)]
    assert {x.aval.shape for e in residual for x in e.invars} == {(B, Q + L, d), (B, Q, d), (B, L, d)}
    assert {x.aval.dtype for e in residual for x in (*e.invars, *e.outvars)} == {jnp.dtype(jnp.float32)}
    dots = [e for e in eqns if e.primitive.name == "dot_general"]
    assert dots and {x.aval.dtype for e in dots for x in e.invars} == {jnp.dtype(jnp.bfloat16)}
