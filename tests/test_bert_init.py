"""Stage-1 initialisation from a (tiny, test-made) BERT checkpoint (issue "stage 1" Done-when 4):
the Q-Former's text pass reproduces BERT's encoder, its LM head BERT's MLM logits, the query FFN
equals the text FFN, and the fresh parts stay fresh."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import linen as nn
from flax import traverse_util

from blip2_jax.data.tokenizers import DEC_TOKEN, qformer_tokenizer
from blip2_jax.models import blip2, presets
from blip2_jax.models import config as config_lib
from blip2_jax.parallel import mesh as mesh_lib
from blip2_jax.train.init import initial_params
from blip2_jax.train.layout import build_layout
from blip2_jax.weights.bert_init import init_from_bert, load_bert
from blip2_jax.weights.hf_names import CheckpointMismatchError
from tests.reference import hf_models as ref
from tests.test_train import load_config

BERT_VOCAB = ref.QFORMER["vocab_size"] - 1  # the Q-Former adds [DEC]


def _bert(layers: int) -> transformers.BertForMaskedLM:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=BERT_VOCAB, hidden_size=32, num_hidden_layers=layers,
                                  num_attention_heads=4, intermediate_size=37, max_position_embeddings=64,
                                  layer_norm_eps=1e-12)
    bert = ref.perturb(transformers.BertForMaskedLM(cfg))
    with torch.no_grad():  # LAVIS drops the token-type table; zero it so BERT computes the same thing
        bert.bert.embeddings.token_type_embeddings.weight.zero_()
    return bert


def _load(directory, layers: int = ref.QFORMER["num_hidden_layers"]):
    """A `layers`-deep BERT saved at `directory` and loaded into a fresh stage-1 Q-Former as deep."""
    bert = _bert(layers)
    bert.save_pretrained(directory)
    cfg = config_lib.from_hf(ref.blip2_config(None, image_token_index=None, use_qformer_text_input=True,
                                              qformer_layers=layers).to_dict())
    model = blip2.Blip2Stage1(cfg)
    fresh = nn.unbox(jax.jit(lambda r: blip2.init(cfg, r, model))(jax.random.PRNGKey(0))["params"])
    params = init_from_bert(fresh, load_bert(directory), cfg.qformer)
    return bert, cfg, model, fresh, params


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return _load(tmp_path_factory.mktemp("bert"))


def test_text_pass_and_lm_head_reproduce_bert(loaded):
    _assert_reproduces_bert(loaded)


def test_a_qformer_of_odd_depth_reproduces_bert(tmp_path):
    """3 layers, cross-attention every 2nd: BERT's layer 2 lands in the last, single-layer group."""
    loaded = _load(tmp_path, layers=3)
    _assert_reproduces_bert(loaded)
    remainder = loaded[4]["qformer"]["encoder"]["remainder"]["layer_0"]
    np.testing.assert_array_equal(remainder["intermediate_query"]["dense"]["kernel"],
                                  loaded[0].bert.encoder.layer[2].intermediate.dense.weight.detach().numpy().T)


def _assert_reproduces_bert(loaded) -> None:
    bert, cfg, model, _, params = loaded
    ids, mask = ref.padded_text([9, 5, 7], 9, BERT_VOCAB, first=1)
    with torch.no_grad():
        out = bert(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
    v = {"params": params}
    hidden = model.apply(v, jnp.asarray(ids), jnp.asarray(mask), method=model.text_hidden)
    logits = model.apply(v, hidden, method=model.lm_logits)
    real = mask.astype(bool)
    assert np.abs(np.asarray(hidden) - out.hidden_states[-1].numpy())[real].max() <= 1e-4
    assert np.abs(np.asarray(logits)[..., :BERT_VOCAB] - out.logits.numpy())[real].max() <= 1e-4


def test_query_ffn_starts_as_the_text_ffn(loaded):
    _, _, _, _, params = loaded
    layers = params["qformer"]["encoder"]["layers"]
    for j in ("layer_0", "layer_1"):
        for text, query in (("intermediate", "intermediate_query"), ("output", "output_query")):
            a, b = traverse_util.flatten_dict(layers[j][text]), traverse_util.flatten_dict(layers[j][query])
            assert a.keys() == b.keys()
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])


def test_fresh_parts_stay_fresh(loaded):
    _, _, _, fresh, params = loaded
    flat_fresh, flat = traverse_util.flatten_dict(fresh), traverse_util.flatten_dict(params)
    for path in flat:
        if "crossattention" in path or path[0] in ("vision_model", "query_tokens", "vision_projection",
                                                   "text_projection", "itm_head", "temp"):
            np.testing.assert_array_equal(flat[path], flat_fresh[path], err_msg="/".join(path))
    dec_row = flat[("embeddings", "word_embeddings", "embedding")][BERT_VOCAB]
    np.testing.assert_array_equal(dec_row, flat_fresh[("embeddings", "word_embeddings", "embedding")][BERT_VOCAB])
    assert float(flat[("temp",)]) == pytest.approx(0.07)
    assert 0.015 < float(np.std(flat[("query_tokens",)])) < 0.025  # N(0, 0.02)


def test_bert_that_does_not_fit_is_one_clear_error(loaded):
    _, cfg, _, fresh, _ = loaded
    deeper = {k: v.numpy() for k, v in _bert(6).state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match=r"unexpected: \['bert.encoder.layer.4"):
        init_from_bert(fresh, deeper, cfg.qformer)
    shallower = {k: v.numpy() for k, v in _bert(2).state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match=r"not found in the BERT checkpoint.*\[group 1\]"):
        init_from_bert(fresh, shallower, cfg.qformer)


def test_qformer_tokenizer_adds_dec_after_bert_vocabulary(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = qformer_tokenizer(tmp_path)
    assert tok.bos_token == DEC_TOKEN and tok.bos_token_id == len(vocab) and len(tok) == len(vocab) + 1
    enc = tok("a photo of a cat", padding="max_length", max_length=8, truncation=True)
    assert enc["input_ids"] == [2, 5, 6, 7, 5, 8, 3, 0]
    assert tok("a photo of a cat", max_length=4, truncation=True)["input_ids"] == [2, 5, 6, 3]


def test_the_trainers_init_bert_loads_bert_into_the_layouts_shardings(loaded, tmp_path):
    """`init.bert` as a stage-1 run starts (train/init.py, on a 2x2x2 mesh): the run's random init
    of `config.seed` with BERT loaded as `init_from_bert` loads it into the whole tree (the trainer
    hands it only the Q-Former's text side), every leaf in the layout's sharding."""
    cfg = loaded[1]
    _bert(cfg.qformer.num_hidden_layers).save_pretrained(tmp_path)
    config = load_config("configs/stage1.py", "tiny")
    config.model = presets.to_config_dict(cfg)
    config.update(seed=3)
    layout = build_layout(config, mesh_lib.make_mesh(data=2, fsdp=2, tensor=2))

    def start(bert: str) -> dict:
        config.init.bert = bert
        trainable, frozen = initial_params(config, layout.model, layout.model_cfg, layout.patterns,
                                           (layout.trainable_shardings, layout.frozen_shardings))
        return {**traverse_util.flatten_dict(trainable), **traverse_util.flatten_dict(frozen)}

    got, fresh = start(str(tmp_path)), start("")  # the same seed's random init, without BERT
    want = traverse_util.flatten_dict(init_from_bert(jax.device_get(traverse_util.unflatten_dict(fresh)),
                                                     load_bert(tmp_path), cfg.qformer))
    shardings = {**traverse_util.flatten_dict(layout.trainable_shardings),
                 **traverse_util.flatten_dict(layout.frozen_shardings)}
    assert got.keys() == want.keys()
    for path, value in got.items():
        assert value.sharding == shardings[path], path
        np.testing.assert_array_equal(np.asarray(value), want[path], err_msg="/".join(path))
