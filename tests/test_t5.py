"""T5 / FlanT5 against Hugging Face `transformers` (fp32, tiny random models with perturbed weights)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import linen as nn
from flax import traverse_util
from transformers.models.t5.modeling_t5 import T5Attention as HFT5Attention

from blip2_jax.models import t5
from blip2_jax.models.config import T5Config
from blip2_jax.weights import hf_names as hf

TINY = dict(vocab_size=99, d_model=32, d_ff=37, d_kv=8, num_layers=2, num_decoder_layers=3, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=20,
            decoder_start_token_id=0)
CASES = {
    # FlanT5 as in BLIP-2: gated exact gelu, untied head, no output scaling.
    "flan": dict(feed_forward_proj="gated-gelu", dense_act_fn="gelu", tie_word_embeddings=False),
    # Original T5: relu FFN, head tied to `shared` and decoder outputs scaled by d_model**-0.5.
    "t5": dict(feed_forward_proj="relu", dense_act_fn="relu", tie_word_embeddings=True),
}
B, S, T = 3, 11, 7


def _hf_model(case: str) -> transformers.T5ForConditionalGeneration:
    torch.manual_seed(0)
    hf_cfg = transformers.T5Config(**TINY, **CASES[case])
    model = transformers.T5ForConditionalGeneration(hf_cfg).eval()
    if not CASES[case]["tie_word_embeddings"]:  # transformers 5 ties the head unless told otherwise
        head = torch.randn_like(model.lm_head.weight) * hf_cfg.d_model ** -0.5  # logits O(1), as when scaled
        model.lm_head.weight = torch.nn.Parameter(head)
    with torch.no_grad():  # every tensor (layer norms included) moves, so a mapping error cannot hide
        for p in model.parameters():  # multiplicative noise keeps the initialiser's scale
            p.mul_(1.0 + 0.5 * torch.randn_like(p))
    return model


@functools.lru_cache(maxsize=None)
def _setup(case: str):
    model = _hf_model(case)
    cfg = T5Config(**TINY, **CASES[case])
    ours = t5.T5ForConditionalGeneration(cfg)
    abstract = nn.unbox(jax.eval_shape(ours.init, jax.random.key(0), jnp.zeros((1, 2, cfg.d_model)),
                                       jnp.ones((1, 2), jnp.int32), jnp.zeros((1, 2), jnp.int32))["params"])
    state = dict(model.state_dict())
    if cfg.tie_word_embeddings:  # a tied checkpoint may omit the head: the converter falls back to `shared`
        del state["lm_head.weight"]
    params = jax.tree.map(jnp.asarray, hf.from_hf(state, abstract))
    return model, ours, params


def _inputs(case: str):
    rng = np.random.default_rng(1)
    input_ids = rng.integers(2, TINY["vocab_size"], (B, S))
    attention_mask = np.ones((B, S), np.int64)
    attention_mask[1, 8:] = 0
    attention_mask[2, 4:] = 0
    labels = rng.integers(2, TINY["vocab_size"], (B, T))
    labels[0, 5:] = -100
    labels[2, 3:] = -100
    decoder_input_ids = np.asarray(t5.shift_right(jnp.asarray(labels), 0, 0))
    decoder_attention_mask = (labels != -100).astype(np.int64)
    return input_ids, attention_mask, labels, decoder_input_ids, decoder_attention_mask


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case):
    model, ours, params = _setup(case)
    input_ids, attention_mask, labels, decoder_input_ids, decoder_attention_mask = _inputs(case)
    np.testing.assert_array_equal(
        decoder_input_ids, model._shift_right(torch.tensor(labels)).numpy())  # pylint: disable=protected-access
    with torch.no_grad():
        want = model(input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(attention_mask),
                     decoder_input_ids=torch.tensor(decoder_input_ids),
                     decoder_attention_mask=torch.tensor(decoder_attention_mask)).logits.numpy()

    @jax.jit
    def forward(params, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask):
        embeds = ours.apply({"params": params}, input_ids, method="embed")
        return ours.apply({"params": params}, embeds, attention_mask, decoder_input_ids, decoder_attention_mask)

    got = np.asarray(forward(params, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask))
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.abs(want).max() > 1.0  # the comparison is not trivially small
    # Right padding leaves every query row some visible key, so padded positions must match too.
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_incremental_decoding_matches_full_decode():
    _, ours, params = _setup("flan")
    input_ids, attention_mask, *_ = _inputs("flan")
    variables = {"params": params}
    encoded = ours.apply(variables, ours.apply(variables, input_ids, method="embed"), attention_mask,
                         method="encode")
    prefix, steps, max_length = 3, 6, 12
    tokens = np.random.default_rng(2).integers(2, TINY["vocab_size"], (B, prefix))
    tokens[:, 0] = 0

    @jax.jit
    def step(cache, tokens, index):
        return ours.apply(variables, tokens, encoded, attention_mask, cache=cache, cache_index=index,
                          method="decode")

    cache = ours.init_cache(B, max_length)
    logits, cache = step(cache, tokens, 0)  # the whole prefix in one call, then one token at a time
    step_logits = [logits]
    for i in range(steps):
        next_token = np.asarray(jnp.argmax(logits[:, -1], axis=-1))[:, None]
        tokens = np.concatenate([tokens, next_token], axis=1)
        logits, cache = step(cache, next_token, prefix + i)
        step_logits.append(logits)
    incremental = np.concatenate([np.asarray(x) for x in step_logits], axis=1)
    full, no_cache = ours.apply(variables, tokens, encoded, attention_mask, method="decode")
    assert no_cache is None and cache["k"].shape == (TINY["num_decoder_layers"], B, 4, max_length, 8)
    np.testing.assert_allclose(incremental, np.asarray(full), atol=1e-5, rtol=0)


def test_relative_position_buckets_match_transformers():
    relative = np.arange(-300, 300)
    for num_buckets, max_distance in ((32, 128), (8, 20)):
        for bidirectional in (True, False):
            want = HFT5Attention._relative_position_bucket(  # pylint: disable=protected-access
                torch.tensor(relative), bidirectional=bidirectional, num_buckets=num_buckets,
                max_distance=max_distance).numpy()
            got = t5.relative_position_bucket(jnp.asarray(relative, jnp.int32), bidirectional=bidirectional,
                                              num_buckets=num_buckets, max_distance=max_distance)
            np.testing.assert_array_equal(np.asarray(got), want)


def test_parameters_carry_logical_axes():
    _, ours, _ = _setup("flan")
    boxed = jax.eval_shape(ours.init, jax.random.key(0), jnp.zeros((1, 2, 32)), jnp.ones((1, 2), jnp.int32),
                           jnp.zeros((1, 2), jnp.int32))["params"]
    flat = traverse_util.flatten_dict(boxed, is_leaf=lambda _, x: isinstance(x, nn.Partitioned), sep="/")
    names = {}
    for path, leaf in flat.items():
        assert isinstance(leaf, nn.Partitioned), path
        assert len(leaf.names) == leaf.value.ndim, path
        names[path] = leaf.names
    attn = {"q": ("embed", "heads"), "k": ("embed", "heads"), "v": ("embed", "heads"), "o": ("heads", "embed")}
    ffn = {"wi_0": ("embed", "mlp"), "wi_1": ("embed", "mlp"), "wo": ("mlp", "embed")}
    want = {"shared/embedding": ("vocab", "embed"), "lm_head/kernel": ("embed", "vocab")}
    layer = ("layers",)
    for stack, blocks in (("encoder", ("SelfAttention",)), ("decoder", ("SelfAttention", "EncDecAttention"))):
        want[f"{stack}/relative_attention_bias/embedding"] = ("relpos_buckets", "heads")
        want[f"{stack}/final_layer_norm/scale"] = ("norm",)
        for i, block in enumerate(blocks):
            want.update({f"{stack}/block/layer_{i}/{block}/{k}/kernel": layer + v for k, v in attn.items()})
            want[f"{stack}/block/layer_{i}/layer_norm/scale"] = layer + ("norm",)
        ff = len(blocks)
        want.update({f"{stack}/block/layer_{ff}/DenseReluDense/{k}/kernel": layer + v for k, v in ffn.items()})
        want[f"{stack}/block/layer_{ff}/layer_norm/scale"] = layer + ("norm",)
    assert names == want


def test_shift_right():
    labels = jnp.array([[5, 6, -100, -100], [7, 8, 9, 10]])
    np.testing.assert_array_equal(np.asarray(t5.shift_right(labels, 0, 1)), [[0, 5, 6, 1], [0, 7, 8, 9]])
