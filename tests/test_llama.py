"""The LLaMA-family decoder against transformers' `LlamaForCausalLM` (issue 21 Done-when 1, the LM
part): tiny random models with perturbed weights, odd sizes, grouped-query attention, a
non-default `rope_theta`, every rotary scaling, biases and a tied head; padded batches; each row
alone equal to its row in the batch; cached incremental decoding equal to the full pass; the
Hugging Face name map both ways; and BLIP-2 with a LLaMA text model (its generation against
`generate` is in test_generation)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import linen as nn

from blip2_jax.convert import hf_export
from blip2_jax.models import blip2
from blip2_jax.models import config as config_lib
from blip2_jax.models.config import llama_config_from_hf, llama_config_to_hf
from blip2_jax.models.attention import position_ids_from_mask
from blip2_jax.models.llama import LlamaForCausalLM
from blip2_jax.objectives.stage2 import stage2_loss
from blip2_jax.weights.hf_checkpoint import params_from_state_dict
from blip2_jax.weights.hf_names import from_hf, to_hf
from tests.reference import hf_models as ref
from tests.reference.hf_models import padded_text, perturb
from tests.reference.tokenizers import tiny_opt_tokenizer

VOCAB = 101
# odd sizes: 6 query heads of 6 dims over 2 K/V heads (3 per group), an intermediate of 37
LLAMA = dict(vocab_size=VOCAB, hidden_size=36, intermediate_size=37, num_hidden_layers=3, num_attention_heads=6,
             num_key_value_heads=2, max_position_embeddings=16, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
             pad_token_id=0)
ROPES = {
    "default_theta": dict(rope_type="default", rope_theta=500.0),
    "linear": dict(rope_type="linear", rope_theta=10000.0, factor=2.5),
    "dynamic": dict(rope_type="dynamic", rope_theta=10000.0, factor=3.0),
    "yarn": dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=8,
                 beta_fast=16.0, beta_slow=2.0),
    "llama3": dict(rope_type="llama3", rope_theta=50000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8),
}


def _pair(rope: dict, **overrides):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**dict(LLAMA, **overrides), rope_parameters=dict(rope))
    hf = perturb(transformers.LlamaForCausalLM(config))
    cfg = llama_config_from_hf(hf.config.to_dict())
    model = LlamaForCausalLM(cfg)
    abstract = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 3, cfg.hidden_size)),
                                       jnp.ones((1, 3), jnp.int32))["params"])
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    return hf, model, {"params": from_hf(state, abstract)}, state


def _logits(model, variables, ids, mask):
    embeds = model.apply(variables, jnp.asarray(ids), method=model.embed)
    return np.asarray(model.apply(variables, embeds, jnp.asarray(mask))[0])


def _hf_logits(hf, ids, mask):
    """transformers' logits with the positions `generate` gives a left-padded row."""
    positions = torch.tensor(np.asarray(position_ids_from_mask(jnp.asarray(mask))))
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=positions).logits.numpy()


@pytest.mark.parametrize("rope", list(ROPES), ids=list(ROPES))
def test_llama_matches_transformers_on_a_padded_batch(rope):
    """Rows of 5, 13 and 9 tokens, left-padded to 13; `dynamic` and `yarn` past the 16 positions of
    the table by a longer batch too (dynamic NTK grows its base only there)."""
    hf, model, variables, _ = _pair(ROPES[rope])
    for lengths, width in (([5, 13, 9], 13), ([20, 7], 20)):
        ids, mask = padded_text(lengths, width, VOCAB, left=True, seed=len(lengths))
        got, want = _logits(model, variables, ids, mask), _hf_logits(hf, ids, mask)
        assert np.abs(got - want)[mask.astype(bool)].max() <= 1e-4, rope
        if rope == "dynamic" and width > LLAMA["max_position_embeddings"]:
            continue  # NTK's base grows with the batch's longest row, so a row alone differs (in HF too)
        for row, n in enumerate(lengths):  # alone, without padding, as in the batch
            alone = _logits(model, variables, ids[row:row + 1, width - n:], mask[row:row + 1, width - n:])
            np.testing.assert_allclose(alone[0], got[row, width - n:], atol=1e-5)


@pytest.mark.parametrize("overrides", [dict(attention_bias=True, mlp_bias=True, head_dim=8),
                                       dict(tie_word_embeddings=True, num_key_value_heads=6)],
                         ids=["biases_and_head_dim", "tied_head_multi_head"])
def test_llama_variants_match_transformers(overrides):
    hf, model, variables, _ = _pair(ROPES["default_theta"], **overrides)
    ids, mask = padded_text([4, 11], 11, VOCAB, left=True, seed=3)
    got, want = _logits(model, variables, ids, mask), _hf_logits(hf, ids, mask)
    assert np.abs(got - want)[mask.astype(bool)].max() <= 1e-4
    assert ("lm_head" in variables["params"]) != overrides.get("tie_word_embeddings", False)


@pytest.mark.parametrize("rope", ["llama3", "dynamic"])
def test_cached_decoding_equals_the_full_pass(rope):
    """Prefill a left-padded prompt, then one token at a time into a cache of K/V heads only:
    every step's logits equal the full pass's (dynamic NTK: up to the table's end, where HF and the
    full pass agree on one base)."""
    _, model, variables, _ = _pair(ROPES[rope])
    ids, mask = padded_text([9, 5], 12, VOCAB, left=True, seed=4)
    full = _logits(model, variables, ids, mask)
    embeds = model.apply(variables, jnp.asarray(ids), method=model.embed)
    positions = position_ids_from_mask(jnp.asarray(mask))
    cache = model.apply(variables, 2, ids.shape[1], method=model.init_cache)
    assert cache["k"].shape == (3, 2, 2, 12, 6)  # layers, rows, K/V heads, slots, head_dim
    step = jax.jit(lambda emb, pos, cache, index: model.apply(
        variables, emb, jnp.asarray(mask), position_ids=pos, cache=cache, cache_index=index))
    logits, cache = step(embeds[:, :6], positions[:, :6], cache, 0)
    pieces = [np.asarray(logits)]
    for t in range(6, ids.shape[1]):
        logits, cache = step(embeds[:, t:t + 1], positions[:, t:t + 1], cache, t)
        pieces.append(np.asarray(logits))
    valid = mask.astype(bool)  # a padding position's logits attend to nothing real: not compared
    assert np.abs(np.concatenate(pieces, axis=1) - full)[valid].max() <= 1e-5


def test_names_and_config_round_trip():
    """Ours -> HF names and layouts reproduce transformers' state dict bit for bit; the config
    written back builds the same transformers model."""
    hf, _, variables, state = _pair(ROPES["yarn"])
    back = dict(to_hf(variables["params"]))
    assert back.keys() == state.keys()
    for name, value in state.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)
    cfg = llama_config_from_hf(hf.config.to_dict())
    rebuilt = transformers.LlamaConfig(**llama_config_to_hf(cfg))
    assert rebuilt.rope_parameters == hf.config.rope_parameters
    assert llama_config_from_hf(rebuilt.to_dict()) == cfg


def test_blip2_with_a_llama_matches_transformers_and_converts_both_ways(tmp_path):
    """`Blip2ForConditionalGeneration` with a LLaMA text config (grouped-query attention, rope_theta
    500): logits equal transformers' on a right-padded batch (its forward counts positions from 0,
    ours from the mask: the same on real tokens); HF -> model checkpoint -> HF reproduces every
    tensor bit for bit and transformers loads it with nothing missing."""
    hf = ref.generation_model(ref.LLAMA, seed=5)
    cfg = config_lib.from_hf(hf.config.to_dict())
    assert isinstance(cfg.text, config_lib.LlamaConfig) and cfg.text.num_key_value_heads == 2
    params = params_from_state_dict(ref.state_dict(hf), cfg)
    text, mask = padded_text([6, 2, 4], 6, ref.LLAMA["vocab_size"], avoid=(ref.IMAGE_TOKEN_INDEX,), seed=2)
    image = np.full((3, ref.NUM_QUERY_TOKENS), ref.IMAGE_TOKEN_INDEX)
    ids, mask = np.concatenate([image, text], 1), np.concatenate([np.ones_like(image), mask], 1)
    pixels = ref.pixels(3, seed=4)
    got = np.asarray(blip2.build(cfg).apply({"params": params}, jnp.asarray(ref.nhwc(pixels)), jnp.asarray(ids),
                                            jnp.asarray(mask)).logits)
    with torch.no_grad():
        want = hf(pixel_values=torch.tensor(pixels), input_ids=torch.tensor(ids),
                  attention_mask=torch.tensor(mask)).logits.numpy()
    assert np.abs(got - want)[mask.astype(bool)].max() <= 1e-4
    # the stage-2 loss (LAVIS's concatenation, no <image> tokens) is transformers' loss with the
    # queries' labels ignored
    labels = np.where(text_mask := mask[:, ref.NUM_QUERY_TOKENS:], text, -100)
    loss, _ = stage2_loss(params, {"image": jnp.asarray(ref.nhwc(pixels)), "text_ids": jnp.asarray(text),
                                   "text_mask": jnp.asarray(text_mask), "labels": jnp.asarray(labels)},
                          jax.random.PRNGKey(0), model=blip2.build(cfg), deterministic=True)
    with torch.no_grad():
        hf_loss = hf(pixel_values=torch.tensor(pixels), input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     labels=torch.tensor(np.concatenate([np.full_like(image, -100), labels], 1))).loss
    assert float(loss) == pytest.approx(float(hf_loss), rel=1e-5)
    hf.save_pretrained(tmp_path / "hf")
    tiny_opt_tokenizer().save_pretrained(tmp_path / "hf")  # any LLM tokenizer: the export adds <image> to it
    hf_export.from_hf(tmp_path / "hf", tmp_path / "ours")
    hf_export.to_hf(tmp_path / "ours", tmp_path / "back")
    back, info = transformers.Blip2ForConditionalGeneration.from_pretrained(tmp_path / "back",
                                                                            output_loading_info=True)
    assert not any(info.values()), info
    assert back.config.text_config.rope_parameters == hf.config.text_config.rope_parameters
    original, written = ref.state_dict(hf), ref.state_dict(back)
    assert written.keys() == original.keys()
    for name, value in original.items():
        np.testing.assert_array_equal(written[name], value, err_msg=name)
