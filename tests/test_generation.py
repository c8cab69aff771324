"""Generation against `transformers.generate` on tiny perturbed BLIP-2 models: greedy and beam
search give the same token ids (length/repetition penalties, min new tokens, early stopping, several
returned beams), each sample's output in a padded batch equals its output alone, and the sampling
processors equal transformers' warpers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers.generation.logits_process as hf_lp
from flax.core import FrozenDict

from blip2_jax.generation import logits as lp
from blip2_jax.generation.config import GenerationConfig
from blip2_jax.generation.decode import decoding_params, generate_fn
from blip2_jax.models import blip2, layers
from blip2_jax.models import config as config_lib
from blip2_jax.weights.hf_checkpoint import params_from_state_dict
from tests.reference import hf_models as ref

Q, IMAGE = ref.NUM_QUERY_TOKENS, ref.IMAGE_TOKEN_INDEX
MAX_NEW = 10
# transformers 5 cannot beam-search a T5 whose decoder is deeper than its encoder (its cache is sized
# by the encoder's depth), so the T5 here is symmetric; tests/test_t5.py covers the asymmetric one.
T5 = dict(ref.T5, num_decoder_layers=2)
# The tiny T5 never emits its real EOS in 10 tokens; a frequent id as EOS exercises finished beams.
EOS = {"opt": ref.OPT["eos_token_id"], "t5": 86, "llama": 98}  # the tiny LLaMA never emits its real EOS either
TEXT = {"opt": ref.OPT, "t5": T5, "llama": ref.LLAMA}
SETTINGS = {
    "greedy_repetition": dict(num_beams=1, repetition_penalty=1.3, min_new_tokens=2),
    "beam3": dict(num_beams=3, length_penalty=0.7, min_new_tokens=2, repetition_penalty=1.2),
    "beam5_two_returned": dict(num_beams=5, length_penalty=2.0, min_new_tokens=3, repetition_penalty=1.5,
                               num_return_sequences=2),
    "beam5_negative_length_penalty_early_stop": dict(num_beams=5, length_penalty=-1.0, min_new_tokens=1,
                                                     early_stopping=True),
    "beam3_never_stop_early": dict(num_beams=3, length_penalty=1.5, early_stopping="never"),
}


def _prompts(kind: str, lengths: list[int], seed: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """[<image>]*Q + text, decoder-only (OPT, LLaMA) left-padded with their pad id (their real prompts
    start with BOS), T5 right-padded."""
    text, decoder_only = TEXT[kind], kind != "t5"
    ids, mask = ref.padded_text(lengths, max(lengths), text["vocab_size"], left=decoder_only, avoid=(IMAGE,),
                                seed=seed, first=text["bos_token_id"] if decoder_only else None)
    ids = np.where(mask == 1, ids, text["pad_token_id"])
    image = np.full((len(lengths), Q), IMAGE)
    return np.concatenate([image, ids], 1), np.concatenate([np.ones_like(image), mask], 1)


def _lm(kind: str, qformer_layers: int = ref.QFORMER["num_hidden_layers"]) -> dict:
    hf = ref.generation_model(TEXT[kind], seed=3, qformer_layers=qformer_layers)
    cfg = config_lib.from_hf(hf.config.to_dict())
    ids, mask = _prompts(kind, [3, 1, 5])
    return dict(kind=kind, hf=hf, model=blip2.build(cfg), params=params_from_state_dict(ref.state_dict(hf), cfg),
                pixels=ref.pixels(3, seed=1), ids=ids, mask=mask, eos=EOS[kind])


@pytest.fixture(scope="module", params=["opt", "t5", "llama"])
def lm(request):
    return _lm(request.param)


def _cut(rows: np.ndarray, eos: int) -> list[list[int]]:
    """Each sequence up to and including its first EOS (what follows is padding)."""
    out = []
    for row in rows.tolist():
        out.append(row[:row.index(eos) + 1] if eos in row else row)
    return out


def _ours(lm, settings, pixels=None, ids=None, mask=None):
    pixels, ids, mask = (lm[k] if v is None else v for k, v in
                         (("pixels", pixels), ("ids", ids), ("mask", mask)))
    cfg = GenerationConfig(max_new_tokens=MAX_NEW, eos_token_id=lm["eos"], **settings)
    out = generate_fn(lm["model"], cfg)(lm["params"], jnp.asarray(ref.nhwc(pixels)), jnp.asarray(ids),
                                        jnp.asarray(mask))
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    assert tokens.shape == (ids.shape[0], cfg.num_return_sequences, MAX_NEW)
    return tokens.reshape(-1, MAX_NEW), lengths.reshape(-1)


def _theirs(lm, settings):
    text = TEXT[lm["kind"]]
    with torch.no_grad():
        out = lm["hf"].generate(pixel_values=torch.tensor(lm["pixels"]), input_ids=torch.tensor(lm["ids"]),
                                attention_mask=torch.tensor(lm["mask"]), do_sample=False, max_new_tokens=MAX_NEW,
                                eos_token_id=lm["eos"], pad_token_id=text["pad_token_id"], **settings).numpy()
    # Decoder-only outputs repeat the prompt; encoder-decoder ones start with the decoder start id.
    return out[:, lm["ids"].shape[1]:] if lm["kind"] != "t5" else out[:, 1:]


@pytest.mark.parametrize("name", list(SETTINGS))
def test_token_ids_equal_transformers_generate(lm, name):
    settings = SETTINGS[name]
    tokens, lengths = _ours(lm, settings)
    expected = _cut(_theirs(lm, settings), lm["eos"])
    assert _cut(tokens, lm["eos"]) == expected
    assert lengths.tolist() == [len(seq) for seq in expected]
    if name == "beam3":  # the comparison covers beams that finished on EOS, not only at max length
        assert (lengths < MAX_NEW).any()


@pytest.mark.parametrize("kind,qformer_layers", [("opt", 3), ("t5", 5)])
def test_any_qformer_depth_generates_what_transformers_does(kind, qformer_layers):
    """Q-Formers whose depth is not a multiple of the cross-attention frequency (2)."""
    lm = _lm(kind, qformer_layers)
    for name in ("greedy_repetition", "beam3"):
        tokens, _ = _ours(lm, SETTINGS[name])
        assert _cut(tokens, lm["eos"]) == _cut(_theirs(lm, SETTINGS[name]), lm["eos"]), name


def test_each_sample_alone_equals_its_row_in_the_padded_batch(lm):
    """Rows 0 and 1 have padding in the batch and none alone (row 2, the longest, has none in either)."""
    lengths, name = [3, 1, 5], "beam3"
    batch, _ = _ours(lm, SETTINGS[name])
    for row, n in enumerate(lengths[:2]):
        ids, mask = _prompts(lm["kind"], lengths)
        keep = slice(ids.shape[1] - Q - n, None) if lm["kind"] != "t5" else slice(0, Q + n)
        alone_ids = np.concatenate([ids[row:row + 1, :Q], ids[row:row + 1, Q:][:, keep]], 1) \
            if lm["kind"] != "t5" else ids[row:row + 1, keep]
        alone_mask = np.ones_like(alone_ids)
        alone, _ = _ours(lm, SETTINGS[name], lm["pixels"][row:row + 1], alone_ids, alone_mask)
        np.testing.assert_array_equal(alone[0], batch[row])


@pytest.mark.parametrize("lm", ["opt"], indirect=True)  # the search loop is the same for both LLMs
def test_sampling_is_seeded_and_top_k_1_is_greedy(lm):
    greedy, _ = _ours(lm, dict(num_beams=1))
    cfg = GenerationConfig(max_new_tokens=MAX_NEW, eos_token_id=lm["eos"], do_sample=True, temperature=3.0,
                           top_k=0, num_return_sequences=2)
    sample = generate_fn(lm["model"], cfg)
    args = (lm["params"], jnp.asarray(ref.nhwc(lm["pixels"])), jnp.asarray(lm["ids"]), jnp.asarray(lm["mask"]))
    first, again, other = (np.asarray(sample(*args, jax.random.PRNGKey(s)).tokens) for s in (0, 0, 1))
    assert first.shape == (3, 2, MAX_NEW)
    np.testing.assert_array_equal(first, again)
    assert (first != other).any() and (first[:, 0] != first[:, 1]).any()
    cfg = GenerationConfig(max_new_tokens=MAX_NEW, eos_token_id=lm["eos"], do_sample=True, top_k=1)
    got = generate_fn(lm["model"], cfg)(*args, jax.random.PRNGKey(0)).tokens
    np.testing.assert_array_equal(np.asarray(got)[:, 0], greedy)


def test_decoding_layout_computes_what_the_scanned_model_does(lm):
    """The decoding layout (LLM layers unrolled, their kernels stored (out, in), `decoding_params`)
    gives the scanned model's logits, and `generate` returns the same from either layout."""
    model, params = lm["model"], lm["params"]
    unrolled = decoding_params(model, params)
    node, stack = unrolled["language_model"], params["language_model"]
    for key in blip2.LANGUAGE_MODELS[type(model.config.text)].DECODER_LAYERS:
        node, stack = node[key], stack[key]
    depth = TEXT[lm["kind"]].get("num_decoder_layers", TEXT[lm["kind"]].get("num_hidden_layers"))
    assert sorted(node) == [str(i) for i in range(depth)]
    stacked = {jax.tree_util.keystr(path): x for path, x in jax.tree_util.tree_leaves_with_path(stack)}
    last = {jax.tree_util.keystr(path): x for path, x in jax.tree_util.tree_leaves_with_path(node[str(depth - 1)])}
    kernels = [name for name in stacked if name.endswith("['kernel']")]
    assert kernels and not any(name.endswith("['kernel']") for name in last)
    for name in kernels:  # the last layer's, transposed
        np.testing.assert_array_equal(np.asarray(last[name.replace("['kernel']", "['kernel_t']")]),
                                      np.asarray(stacked[name][-1]).T)
    args = (jnp.asarray(ref.nhwc(lm["pixels"])), jnp.asarray(lm["ids"]), jnp.asarray(lm["mask"]))
    extra = {} if lm["kind"] != "t5" else dict(decoder_input_ids=jnp.asarray(lm["ids"][:, -4:] % 50))
    scanned = model.apply({"params": params}, *args, **extra).logits
    flat = model.clone(scan_lm_layers=False).apply({"params": unrolled}, *args, **extra).logits
    np.testing.assert_allclose(np.asarray(flat), np.asarray(scanned), rtol=0, atol=1e-5)  # fp32 fusion order
    cfg = GenerationConfig(max_new_tokens=MAX_NEW, eos_token_id=lm["eos"], num_beams=3)
    a, b = (generate_fn(model, cfg)(p, *args) for p in (params, unrolled))
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_allclose(np.asarray(a.scores), np.asarray(b.scores), rtol=0, atol=1e-6)


def test_the_decoding_layout_transposes_frozen_dict_params_too():
    """Parameters held in Flax `FrozenDict`s get every kernel moved to `kernel_t` (out, in) as plain
    dicts do, layer by layer out of a stack; left untransposed they would still compute, slower."""
    stack = FrozenDict({"fc1": {"kernel": np.arange(24.0).reshape(2, 3, 4), "bias": np.ones((2, 4))},
                        "final_layer_norm": {"scale": np.ones((2, 3))}})
    unrolled = layers.transpose_kernels(layers.unstack_layers(stack))
    assert sorted(unrolled) == ["0", "1"] and all(type(layer["fc1"]) is dict for layer in unrolled.values())
    for i in (0, 1):
        assert sorted(unrolled[str(i)]["fc1"]) == ["bias", "kernel_t"]
        np.testing.assert_array_equal(unrolled[str(i)]["fc1"]["kernel_t"], stack["fc1"]["kernel"][i].T)
        np.testing.assert_array_equal(unrolled[str(i)]["final_layer_norm"]["scale"], np.ones(3))


def _scores(seed: int, ties: bool = False) -> np.ndarray:
    scores = np.random.default_rng(seed).standard_normal((4, 50)).astype(np.float32) * 3
    if ties:  # equal scores around the k-th: top-k keeps them all (top-p's choice among ties is arbitrary)
        scores[1, np.argsort(-scores[1])[3:9]] = np.sort(scores[1])[::-1][5]
    return scores


@pytest.mark.parametrize("k", [1, 5, 12])
def test_top_k_equals_transformers(k):
    scores = _scores(0, ties=True)
    expected = hf_lp.TopKLogitsWarper(k)(None, torch.tensor(scores)).numpy()
    np.testing.assert_array_equal(np.asarray(lp.top_k(jnp.asarray(scores), k)), expected)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_top_p_keeps_the_tokens_transformers_keeps(p):
    scores = _scores(1)
    expected = np.isfinite(hf_lp.TopPLogitsWarper(p)(None, torch.tensor(scores)).numpy())
    got = np.asarray(lp.top_p(jnp.asarray(scores), p))
    np.testing.assert_array_equal(np.isfinite(got), expected)
    np.testing.assert_array_equal(got[expected], scores[expected])


def test_repetition_penalty_equals_transformers_and_ignores_unwritten_slots():
    scores = _scores(2)
    history = np.random.default_rng(3).integers(0, 50, (4, 7))
    history[:, 0] = history[:, 1]  # a repeated id is penalised once
    expected = hf_lp.RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor(history), torch.tensor(scores)).numpy()
    padded = np.concatenate([history, np.full((4, 3), -1)], 1)  # -1: slots not generated yet
    got = np.asarray(lp.repetition_penalty(jnp.asarray(scores), jnp.asarray(padded), 1.7))
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_bad_settings_are_rejected_with_the_reason():
    with pytest.raises(ValueError, match="num_return_sequences"):
        GenerationConfig(num_beams=2, num_return_sequences=3)
    with pytest.raises(ValueError, match="min_new_tokens"):
        GenerationConfig(max_new_tokens=3, min_new_tokens=4)
    with pytest.raises(ValueError, match="beam sampling"):
        GenerationConfig(num_beams=2, do_sample=True)
