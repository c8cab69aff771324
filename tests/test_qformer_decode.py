"""A stage-1 model's captions from its Q-Former's ITG head (`generation/qformer_decode.py`), checked
against the teacher-forced ITG logits training reads (themselves tested against LAVIS's ITG loss):
greedy picks their argmax at every position, beam search's score is their summed log-probability,
LAVIS's min_len holds EOS back, and a sampled image's captions do not depend on its batch."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from blip2_jax.generation.config import GenerationConfig
from blip2_jax.generation.qformer_decode import generate_captions
from blip2_jax.models import blip2, presets

EOS, PAD = 3, 0


@pytest.fixture(scope="module")
def stage1():
    cfg = presets.get("tiny_itm")
    model = blip2.Blip2Stage1(cfg)
    params = nn.unbox(jax.jit(lambda r: blip2.init(cfg, r, model))(jax.random.PRNGKey(0))["params"])
    size = cfg.vision.image_size
    pixels = jax.random.normal(jax.random.PRNGKey(1), (3, size, size, 3))
    return model, params, pixels, cfg.qformer.vocab_size - 1  # [DEC] is the last id


def _itg_logp(model, params, pixels, bos, tokens):
    """log p of every next token under the teacher-forced ITG pass over [DEC] + tokens."""
    ids = jnp.concatenate([jnp.full((tokens.shape[0], 1), bos), tokens], axis=1)
    embeds = model.apply({"params": params}, pixels, method="encode_image")
    _, kv = model.apply({"params": params}, embeds, method="query_pass")
    return jax.nn.log_softmax(model.apply({"params": params}, ids, jnp.ones_like(ids), kv, method="itg_logits"))


def _captions(stage1, config, rng=None, pixels=None):
    model, params, all_pixels, bos = stage1
    return generate_captions(params, all_pixels if pixels is None else pixels, rng, model=model, config=config,
                             bos=bos, eos=EOS, pad=PAD)


def test_greedy_follows_the_itg_logits(stage1):
    model, params, pixels, bos = stage1
    out = _captions(stage1, GenerationConfig(max_new_tokens=6))
    tokens = out.tokens[:, 0]
    logp = _itg_logp(model, params, pixels, bos, tokens)
    np.testing.assert_array_equal(np.argmax(logp[:, :-1], -1), tokens)


def test_beam_score_is_the_summed_itg_log_probability(stage1):
    model, params, pixels, bos = stage1
    out = _captions(stage1, GenerationConfig(max_new_tokens=5, num_beams=3, length_penalty=0.0))
    tokens = out.tokens[:, 0]
    logp = np.asarray(_itg_logp(model, params, pixels, bos, tokens))
    chosen = np.take_along_axis(logp[:, :-1], np.asarray(tokens)[..., None], -1)[..., 0]
    np.testing.assert_allclose(out.scores[:, 0], chosen.sum(-1), rtol=1e-5)
    greedy = _captions(stage1, GenerationConfig(max_new_tokens=5)).scores[:, 0]
    assert np.all(np.asarray(out.scores[:, 0]) >= np.asarray(greedy) - 1e-5)


def test_lavis_min_length_counts_dec(stage1):
    model, params, pixels, bos = stage1
    eos = int(np.argmax(_itg_logp(model, params, pixels, bos, jnp.zeros((3, 0), jnp.int32))[0, 0]))
    config = GenerationConfig(max_new_tokens=6, semantics="lavis", min_length=4)
    free = generate_captions(params, pixels, model=model, config=dataclasses.replace(config, min_length=1),
                             bos=bos, eos=eos, pad=PAD)
    assert int(free.lengths[0, 0]) == 1  # the most likely first token is EOS: stops at once
    held = generate_captions(params, pixels, model=model, config=config, bos=bos, eos=eos, pad=PAD)
    assert int(held.lengths[0, 0]) >= 3  # [DEC] + 3 new tokens before EOS may come


def test_sampled_captions_do_not_depend_on_the_batch(stage1):
    config = GenerationConfig(max_new_tokens=6, do_sample=True, top_p=0.9, num_return_sequences=3)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(7), i))(jnp.arange(3))
    together = _captions(stage1, config, keys).tokens
    alone = _captions(stage1, config, keys[1:2], stage1[2][1:2]).tokens
    np.testing.assert_array_equal(together[1], alone[0])
    assert len({tuple(t) for t in np.asarray(together).reshape(9, -1).tolist()}) > 1  # they do sample
