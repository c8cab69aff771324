"""Feature extraction (issue 22, Done-when 1) against transformers on tiny perturbed models: every
output transformers has (`Blip2VisionModel`, `get_qformer_features`, `get_image_features`,
`Blip2VisionModelWithProjection`, `Blip2TextModelWithProjection`) to 1e-4; the multimodal rows
through the ITM head give transformers' ITM logits; the ITC features give its ITC scores; the
extractor from a saved directory equals the pure functions, batch by batch."""
import jax
import numpy as np
import pytest
import torch
import transformers

from blip2_jax import features
from blip2_jax.data.images import preprocess_images
from blip2_jax.evaluate.model import EvalModel
from blip2_jax.evaluate.retrieval import retrieval_scores
from blip2_jax.parallel import mesh as mesh_lib
from blip2_jax.errors import UserError
from blip2_jax.models import blip2
from blip2_jax.models import config as config_lib
from blip2_jax.weights.hf_checkpoint import params_from_state_dict
from tests.reference import hf_models as ref

TOL = 1e-4


@pytest.fixture(scope="module")
def retrieval():
    hf = ref.retrieval_model(seed=21).eval()
    cfg = config_lib.from_hf(hf.config.to_dict())
    model = blip2.build(cfg, "Blip2ForImageTextRetrieval")
    return hf, model, params_from_state_dict(ref.state_dict(hf), cfg)


@pytest.fixture(scope="module")
def generation():
    hf = ref.generation_model(ref.OPT, seed=22).eval()
    cfg = config_lib.from_hf(hf.config.to_dict())
    return hf, blip2.build(cfg), params_from_state_dict(ref.state_dict(hf), cfg)


def _with(cls, hf, config):
    """A transformers class built from `hf`'s tensors (its names are a subset of `hf`'s)."""
    other = cls(config).eval()
    missing, _ = other.load_state_dict(hf.state_dict(), strict=False)
    assert not missing, missing
    return other


def _close(ours, theirs):
    np.testing.assert_allclose(np.asarray(ours), theirs.detach().numpy(), atol=TOL, rtol=TOL)


def test_image_features_equal_transformers(retrieval, generation):
    pixels = ref.pixels(3, seed=5)
    hf, model, params = retrieval
    with torch.no_grad():
        vision = hf.vision_model(pixel_values=torch.tensor(pixels)).last_hidden_state
        query = hf.qformer(query_embeds=hf.query_tokens.expand(3, -1, -1), encoder_hidden_states=vision,
                           encoder_attention_mask=torch.ones(vision.shape[:2], dtype=torch.long)).last_hidden_state
        projected = _with(transformers.Blip2VisionModelWithProjection, hf, hf.config)(
            pixel_values=torch.tensor(pixels)).image_embeds
    x = ref.nhwc(pixels)
    _close(features.image_features(params, x, model=model, name="image_embeds"), vision)
    _close(features.image_features(params, x, model=model, name="query_output"), query)
    _close(features.image_features(params, x, model=model, name="itc_image"), projected)
    hf, model, params = generation
    with torch.no_grad():
        lm_inputs = hf.get_image_features(pixel_values=torch.tensor(pixels)).pooler_output
        qformer = transformers.Blip2Model(hf.config).eval()
        qformer.load_state_dict(hf.state_dict(), strict=False)
        query = qformer.get_qformer_features(pixel_values=torch.tensor(pixels))
    _close(features.image_features(params, x, model=model, name="language_inputs"), lm_inputs)
    _close(features.image_features(params, x, model=model, name="query_output"), query)


def test_text_and_multimodal_features_equal_transformers(retrieval):
    hf, model, params = retrieval
    ids, mask = ref.padded_text([6, 3, 5], 6, ref.QFORMER["vocab_size"], seed=8, first=2)
    pixels = ref.pixels(3, seed=9)
    with torch.no_grad():
        text = _with(transformers.Blip2TextModelWithProjection, hf, hf.config)(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).text_embeds
        itm = hf(pixel_values=torch.tensor(pixels), input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 use_image_text_matching_head=True).logits_per_image
        itc = hf(pixel_values=torch.tensor(pixels), input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 use_image_text_matching_head=False).logits_per_image
    ours_text = np.asarray(features.text_features(params, ids, mask, model=model))
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours_text[valid], text.numpy()[valid], atol=TOL, rtol=TOL)
    rows = np.asarray(features.multimodal_features(params, ref.nhwc(pixels), ids, mask, model=model))
    head = params["itm_head"]
    _close(np.mean(rows @ np.asarray(head["kernel"]) + np.asarray(head["bias"]), axis=1), itm)
    image = np.asarray(features.image_features(params, ref.nhwc(pixels), model=model, name="itc_image"))
    scores = np.max(np.einsum("iqe,te->iqt", image, ours_text[:, 0]), axis=1)  # the retrieval evaluator's ITC
    _close(scores, itc)  # cosine similarities, as transformers' ITC logits


def test_the_extractor_reads_a_directory_and_batches_as_the_functions(retrieval, tmp_path):
    hf, model, params = retrieval
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "bert").mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "photo", "of"]
    (tmp_path / "bert" / "vocab.txt").write_text("\n".join(words))
    extractor = features.FeatureExtractor.from_pretrained(tmp_path / "hf", tokenizer=str(tmp_path / "bert"),
                                                          batch_size=2)
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (30, 30, 3), dtype=np.uint8) for _ in range(3)]
    x = preprocess_images(images, model.config.vision.image_size)
    for name in ("image_embeds", "query_output", "itc_image"):
        np.testing.assert_allclose(extractor.images(images, name),
                                   features.image_features(params, x, model=model, name=name), atol=1e-6)
    texts = ["a red circle", "a photo of a red circle", "of"]
    tok = extractor.tokenizer(texts, padding="max_length", max_length=8)
    want = features.text_features(params, np.asarray(tok["input_ids"]), np.asarray(tok["attention_mask"]),
                                  model=model)
    got = extractor.texts(texts)
    assert got.shape == (3, 8, model.config.image_text_hidden_size)
    np.testing.assert_allclose(got[:, 0], np.asarray(want)[:, 0], atol=1e-6)
    assert extractor.multimodal(images, texts).shape == (3, model.config.num_query_tokens,
                                                         model.config.qformer.hidden_size)
    # the ITC features give the retrieval evaluator's ITC scores (k_test 0: no ITM re-ranking)

    mesh = mesh_lib.make_mesh(-1, 1, 1, jax.devices()[:1])
    evaluated = retrieval_scores(EvalModel(model, model.config, params, ""), mesh, images, texts,
                                 extractor.tokenizer, k_test=0, batch_size=2)
    itc = np.max(np.einsum("iqe,te->iqt", extractor.images(images, "itc_image"), got[:, 0]), axis=1)
    np.testing.assert_allclose(itc, evaluated.i2t, atol=1e-5)
    with pytest.raises(UserError, match="language_inputs needs a stage-2 model"):
        extractor.images(images, "language_inputs")
    with pytest.raises(UserError, match="unknown feature 'pixels'"):
        extractor.images(images, "pixels")
