"""blip2_jax against `transformers` on tiny random models with every tensor perturbed (fp32).

Covers issue "model family" Done-when 2 and 3: vision hidden states, Q-Former outputs, ITM
logits, ITC scores, OPT and T5 LM logits on padded batches, and position-embedding
interpolation to a larger resolution; and Q-Formers of 3 and 5 layers (issue 17).
"""
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from blip2_jax.models import blip2
from blip2_jax.models import config as config_lib
from blip2_jax.weights.hf_checkpoint import params_from_state_dict
from tests.reference import hf_models as ref

TOL = 1e-4
Q = ref.NUM_QUERY_TOKENS


def _ours(hf_model):
    cfg = config_lib.from_hf(hf_model.config.to_dict())
    return cfg, blip2.build(cfg), {"params": params_from_state_dict(ref.state_dict(hf_model), cfg)}


def _max_diff(a, b, where=None):
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return float(d[where].max() if where is not None else d.max())


@pytest.fixture(scope="module")
def retrieval():
    hf = ref.retrieval_model()
    cfg, model, variables = _ours(hf)
    px = ref.pixels(3)
    ids, mask = ref.padded_text([5, 3, 7], 7, ref.QFORMER["vocab_size"], first=1)
    with torch.no_grad():
        t = lambda x: torch.tensor(x)  # noqa: E731
        expected = dict(
            vision=hf.vision_model(t(px)).last_hidden_state.numpy(),
            itm=hf(t(px), t(ids), t(mask), use_image_text_matching_head=True).logits_per_image.numpy(),
            itc=hf(t(px), t(ids), t(mask)).logits_per_image.numpy())
    args = (jnp.asarray(ref.nhwc(px)), jnp.asarray(ids), jnp.asarray(mask))
    got = dict(
        vision=model.apply(variables, args[0], method=model.encode_image),
        itm=model.apply(variables, *args, use_image_text_matching_head=True).logits_per_image,
        itc=model.apply(variables, *args).logits_per_image)
    return expected, got


@pytest.mark.parametrize("output", ["vision", "itm", "itc"])
def test_retrieval_model_matches_transformers(retrieval, output):
    expected, got = retrieval
    assert got[output].shape == expected[output].shape
    assert _max_diff(got[output], expected[output]) <= TOL


def test_itc_is_a_full_image_by_text_matrix(retrieval):
    expected, _ = retrieval
    assert expected["itc"].shape == (3, 3) and expected["itm"].shape == (3, 2)


def _prompt_batch(left: bool):
    ids, mask = ref.padded_text([6, 4, 2], 6, 99, left=left, avoid=(ref.IMAGE_TOKEN_INDEX,))
    image = np.full((3, Q), ref.IMAGE_TOKEN_INDEX)
    return np.concatenate([image, ids], 1), np.concatenate([np.ones_like(image), mask], 1)


@pytest.fixture(scope="module")
def opt():
    hf = ref.generation_model(ref.OPT)
    cfg, model, variables = _ours(hf)
    px = ref.pixels(3, seed=1)
    ids, mask = _prompt_batch(left=True)  # OPT prompts are left-padded (spec §6.4)
    with torch.no_grad():
        out = hf(pixel_values=torch.tensor(px), input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    ours = model.apply(variables, jnp.asarray(ref.nhwc(px)), jnp.asarray(ids), jnp.asarray(mask))
    return out, ours, mask


def test_opt_qformer_output_matches(opt):
    out, ours, _ = opt
    assert _max_diff(ours.query_output, out.qformer_outputs.last_hidden_state) <= TOL
    assert _max_diff(ours.image_embeds, out.vision_outputs.last_hidden_state) <= TOL


def test_opt_logits_match_on_real_tokens(opt):
    out, ours, mask = opt
    assert ours.logits.shape == tuple(out.logits.shape)
    assert _max_diff(ours.logits, out.logits, mask.astype(bool)) <= TOL


@pytest.fixture(scope="module")
def t5():
    hf = ref.generation_model(ref.T5)
    cfg, model, variables = _ours(hf)
    px = ref.pixels(3, seed=2)
    ids, mask = _prompt_batch(left=False)  # T5 prompts are right-padded
    dec, dec_mask = ref.padded_text([4, 2, 3], 4, 99, seed=3, first=0)
    with torch.no_grad():
        out = hf(pixel_values=torch.tensor(px), input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 decoder_input_ids=torch.tensor(dec), decoder_attention_mask=torch.tensor(dec_mask))
    ours = model.apply(variables, jnp.asarray(ref.nhwc(px)), jnp.asarray(ids), jnp.asarray(mask),
                       jnp.asarray(dec), jnp.asarray(dec_mask))
    return out, ours, dec_mask


def test_t5_logits_match_on_real_tokens(t5):
    out, ours, dec_mask = t5
    assert ours.logits.shape == tuple(out.logits.shape)
    assert _max_diff(ours.logits, out.logits, dec_mask.astype(bool)) <= TOL
    assert _max_diff(ours.query_output, out.qformer_outputs.last_hidden_state) <= TOL


@pytest.fixture(scope="module", params=[3, 5])
def odd_depth(request):
    """Q-Formers of 3 and 5 layers with cross-attention every 2nd layer (layers 0, 2, 4): the
    last group is a lone cross-attention layer. Retrieval (ITM, ITC) and OPT outputs."""
    depth = request.param
    px = ref.pixels(3, seed=6)
    ids, mask = _prompt_batch(left=True)
    text, text_mask = ref.padded_text([5, 3, 7], 7, ref.QFORMER["vocab_size"], first=1)
    generation, retrieval = ref.generation_model(ref.OPT, qformer_layers=depth), ref.retrieval_model(qformer_layers=depth)
    t = lambda x: torch.tensor(x)  # noqa: E731
    with torch.no_grad():
        out = generation(pixel_values=t(px), input_ids=t(ids), attention_mask=t(mask))
        expected = dict(query=out.qformer_outputs.last_hidden_state.numpy(), logits=out.logits.numpy(),
                        itm=retrieval(t(px), t(text), t(text_mask), use_image_text_matching_head=True
                                      ).logits_per_image.numpy(),
                        itc=retrieval(t(px), t(text), t(text_mask)).logits_per_image.numpy())
    cfg, model, variables = _ours(generation)
    assert len(generation.qformer.encoder.layer) == cfg.qformer.num_hidden_layers == depth
    assert cfg.qformer.layer_groups == (depth // 2, 1)
    ours = model.apply(variables, jnp.asarray(ref.nhwc(px)), jnp.asarray(ids), jnp.asarray(mask))
    _, model, variables = _ours(retrieval)
    args = (jnp.asarray(ref.nhwc(px)), jnp.asarray(text), jnp.asarray(text_mask))
    got = dict(query=ours.query_output, logits=np.where(mask[..., None] == 1, ours.logits, 0),
               itm=model.apply(variables, *args, use_image_text_matching_head=True).logits_per_image,
               itc=model.apply(variables, *args).logits_per_image)
    expected["logits"] = np.where(mask[..., None] == 1, expected["logits"], 0)
    return expected, got


@pytest.mark.parametrize("output", ["query", "logits", "itm", "itc"])
def test_any_qformer_depth_matches_transformers(odd_depth, output):
    expected, got = odd_depth
    assert got[output].shape == expected[output].shape
    assert _max_diff(got[output], expected[output]) <= TOL


def test_legacy_prepend_path_equals_image_token_path(opt):
    """Without image_token_index (old checkpoints) the visual prompt is prepended; same logits."""
    hf = ref.generation_model(ref.OPT)
    cfg, model, variables = _ours(hf)
    legacy = blip2.build(cfg.replace(image_token_index=None))
    px = jnp.asarray(ref.nhwc(ref.pixels(3, seed=1)))
    ids, mask = _prompt_batch(left=True)
    new = model.apply(variables, px, jnp.asarray(ids), jnp.asarray(mask)).logits
    old = legacy.apply(variables, px, jnp.asarray(ids[:, Q:]), jnp.asarray(mask[:, Q:])).logits
    assert _max_diff(new, old) <= 1e-5


def test_position_interpolation_matches_transformers():
    """A model built for 30 px run at 46 px (15x15 -> 23x23 patches), like 224 -> 364 px."""
    hf = ref.retrieval_model(seed=4)
    cfg, model, variables = _ours(hf)
    px = ref.pixels(2, size=46, seed=5)
    with torch.no_grad():
        expected = hf.vision_model(torch.tensor(px), interpolate_pos_encoding=True).last_hidden_state.numpy()
    got = model.apply(variables, jnp.asarray(ref.nhwc(px)), interpolate_pos_encoding=True,
                      method=model.encode_image)
    assert got.shape == expected.shape == (2, 23 * 23 + 1, ref.VISION["hidden_size"])
    assert _max_diff(got, expected) <= TOL
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        model.apply(variables, jnp.asarray(ref.nhwc(px)), method=model.encode_image)
