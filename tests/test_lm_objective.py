"""The demo's text-only LM objective against `transformers`' OPT loss, and the loader's LM records."""
import jax
import numpy as np
import pytest
import torch

from blip2_jax.data.loader import RecordProcessor
from blip2_jax.models.blip2 import Blip2ForConditionalGeneration
from blip2_jax.objectives import lm
from blip2_jax.objectives.lm import lm_loss
from blip2_jax.weights.hf_checkpoint import load_pretrained
from tests.reference import hf_models as ref
from tests.reference.tokenizers import tiny_opt_tokenizer


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    directory = tmp_path_factory.mktemp("opt")
    hf = ref.generation_model(ref.OPT, seed=2)
    hf.save_pretrained(directory)
    config, params = load_pretrained(directory)
    return hf.eval(), Blip2ForConditionalGeneration(config), params


@pytest.mark.parametrize("with_labels", [False, True])
def test_lm_loss_equals_transformers_opt_loss(models, with_labels):
    hf, model, params = models
    ids, mask = ref.padded_text([7, 3, 9], 10, ref.OPT["vocab_size"], first=2, seed=4)
    labels = np.where(mask == 1, ids, -100)
    if with_labels:  # only what follows each row's first 2 tokens is a target
        labels[:, :2] = -100
    batch = {"text_ids": ids.astype(np.int32), "text_mask": mask.astype(np.int32)}
    if with_labels:
        batch["labels"] = labels.astype(np.int32)
    ours, _ = lm_loss(params, batch, jax.random.PRNGKey(0), model=model, deterministic=True)
    with torch.no_grad():  # transformers shifts the labels itself and ignores -100
        theirs = hf.language_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                   labels=torch.tensor(labels)).loss
    assert float(ours) == pytest.approx(float(theirs), rel=1e-5, abs=1e-6)


def test_lm_loss_with_a_context_before_bos_equals_transformers(models):
    """The demo's captions sit before BOS, left-padded, where stage 2 puts the queries: the loss is
    HF OPT's on [context ; text] embeddings, positions from the joint mask, the context no target."""
    hf, model, params = models
    context, context_mask = ref.padded_text([2, 4, 3], 4, ref.OPT["vocab_size"], left=True, seed=5)
    ids, mask = ref.padded_text([7, 3, 9], 10, ref.OPT["vocab_size"], first=2, seed=4)
    labels = np.where(mask == 1, ids, -100)
    labels[:, :2] = -100
    batch = {k: v.astype(np.int32) for k, v in dict(text_ids=ids, text_mask=mask, labels=labels,
                                                    context_ids=context, context_mask=context_mask).items()}
    ours, _ = lm_loss(params, batch, jax.random.PRNGKey(0), model=model, deterministic=True)
    embed = hf.language_model.get_input_embeddings()
    with torch.no_grad():
        theirs = hf.language_model(
            inputs_embeds=embed(torch.tensor(np.concatenate([context, ids], 1))),
            attention_mask=torch.tensor(np.concatenate([context_mask, mask], 1)),
            labels=torch.tensor(np.concatenate([np.full_like(context, -100), labels], 1))).loss
    assert float(ours) == pytest.approx(float(theirs), rel=1e-5, abs=1e-6)
    without, _ = lm_loss(params, {k: batch[k] for k in ("text_ids", "text_mask", "labels")}, jax.random.PRNGKey(0),
                         model=model, deterministic=True)
    assert abs(float(without) - float(ours)) > 1e-3  # the context is read


def test_lm_records_mask_their_prompt(tmp_path):
    tiny_opt_tokenizer().save_pretrained(tmp_path)
    process = RecordProcessor("lm_opt", lm.batch_spec(12), None, str(tmp_path), 12)
    row = process({"id": "x", "text": "a photo of w3 w4", "prompt": "a photo of"}, np.random.default_rng(0))
    # <s> a photo of | w3 w4 (this word-level tokenizer drops "\n"): the prompt and BOS are no targets
    n = int(row["text_mask"].sum())
    assert row["labels"][:4].tolist() == [-100] * 4 and row["labels"][4:n].tolist() == row["text_ids"][4:n].tolist()
    plain = process({"id": "y", "text": "w5 w6"}, np.random.default_rng(0))
    assert plain["text_mask"].sum() == 3  # <s> w5 w6; every text token a target, as lm_loss without labels
    np.testing.assert_array_equal(plain["labels"], np.where(plain["text_mask"] == 0, -100, plain["text_ids"]))
    with pytest.raises(KeyError, match="no 'text'"):
        process({"id": "z", "caption": "w1"}, np.random.default_rng(0))
    with pytest.raises(KeyError, match="context_length"):
        process({"id": "c", "text": "w5", "context": "w1 w2"}, np.random.default_rng(0))


def test_lm_record_context_is_left_padded_before_bos(tmp_path):
    tiny_opt_tokenizer().save_pretrained(tmp_path)
    process = RecordProcessor("lm_opt", lm.batch_spec(8, context_length=4), None, str(tmp_path), 8, context_length=4)
    row = process({"id": "x", "context": "w1 w2 .", "text": "what is w3 ? w4", "prompt": "what is w3 ?"},
                  np.random.default_rng(0))
    tok = tiny_opt_tokenizer()
    want = tok("w1 w2 .", add_special_tokens=False)["input_ids"]  # no BOS: the text's comes after it
    assert row["context_ids"][1:].tolist() == want and row["context_mask"].tolist() == [0, 1, 1, 1]
    assert row["text_ids"][0] == tok.bos_token_id
    with pytest.raises(ValueError, match="context_length is 4"):
        process({"id": "y", "context": "w1 w2 w3 w4 w5", "text": "w6"}, np.random.default_rng(0))
    with pytest.raises(KeyError, match="needs a 'context'"):
        process({"id": "z", "text": "w6"}, np.random.default_rng(0))
