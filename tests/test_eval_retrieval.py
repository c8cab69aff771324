"""Retrieval evaluation (`eval/retrieval.py`, spec §8) against an independent PyTorch re-rank on the
same tiny random `transformers.Blip2ForImageTextRetrieval`, across meshes, and on bad inputs."""
from __future__ import annotations

import os

import jax
import numpy as np
import pytest
import torch

from blip2_jax.data.images import preprocess_images
from blip2_jax.data.tokenizers import qformer_text, qformer_tokenizer
from blip2_jax.evaluate.model import load_model
from blip2_jax.evaluate.retrieval import TEXT_LENGTH, UNRANKED, retrieval_scores
from blip2_jax.parallel.mesh import make_mesh
from tests.reference import hf_models as ref
from tests.reference import retrieval as torch_retrieval

os.environ["HF_HUB_OFFLINE"] = "1"
NUM_IMAGES, NUM_TEXTS = 13, 29  # neither divides a global batch of 2 x 8 devices
WORDS = [f"w{i}" for i in range(ref.QFORMER["vocab_size"] - 6)]  # + 5 BERT specials + [DEC] = the Q-Former vocab


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """The saved tiny retrieval model with a BERT vocab.txt, and the torch model itself."""
    directory = tmp_path_factory.mktemp("hf_itm")
    model = ref.retrieval_model(seed=3)
    model.save_pretrained(directory)
    (directory / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    return directory, model


@pytest.fixture(scope="module")
def data():
    """Random uint8 images of another size than the model's 30 px, and texts of 1-40 words (some cut at 35)."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (37 + i, 44, 3), dtype=np.uint8) for i in range(NUM_IMAGES)]
    texts = [" ".join(rng.choice(WORDS, rng.integers(1, 41))) for _ in range(NUM_TEXTS)]
    return images, texts


@pytest.fixture(scope="module")
def tokenizer(hf_dir):
    tok = qformer_tokenizer(hf_dir[0])
    assert len(tok) == ref.QFORMER["vocab_size"]
    return tok


@pytest.fixture(scope="module")
def models(hf_dir):
    """Our model loaded on a 1-device and an 8-device mesh."""
    meshes = {n: make_mesh(devices=jax.devices()[:n]) for n in (1, 8)}
    return {n: (load_model(hf_dir[0], mesh), mesh) for n, mesh in meshes.items()}


@pytest.fixture(scope="module")
def scores_8(models, data, tokenizer):
    model, mesh = models[8]
    return retrieval_scores(model, mesh, *data, tokenizer, k_test=5, batch_size=2)


def _torch_scores(hf_dir, data, tokenizer, k_test: int):
    images, texts = data
    pixels = preprocess_images(images, ref.VISION["image_size"]).transpose(0, 3, 1, 2)
    tokens = [qformer_text(tokenizer, t, TEXT_LENGTH) for t in texts]
    ids = np.stack([t["text_ids"] for t in tokens])
    mask = np.stack([t["text_mask"] for t in tokens])
    assert mask.sum(1).max() == TEXT_LENGTH  # the long texts are truncated
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these tiny passes are overhead-bound; 2 threads next to XLA's spin and run ~10x slower
    try:
        return torch_retrieval.retrieval_scores(hf_dir[1], np.ascontiguousarray(pixels), ids, mask, k_test=k_test,
                                                batch_size=16)
    finally:
        torch.set_num_threads(threads)


def test_matches_torch_reference(hf_dir, data, tokenizer, scores_8):
    sims, i2t, t2i = _torch_scores(hf_dir, data, tokenizer, k_test=5)
    np.testing.assert_allclose(scores_8.sims, sims, rtol=0, atol=1e-5)
    for ours, theirs in ((scores_8.i2t, i2t), (scores_8.t2i, t2i)):
        np.testing.assert_array_equal(ours == UNRANKED, theirs == UNRANKED)  # the same pairs re-ranked
        assert ((ours != UNRANKED).sum(1) == 5).all()
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def test_one_device_equals_eight(models, data, tokenizer, scores_8):
    model, mesh = models[1]
    one = retrieval_scores(model, mesh, *data, tokenizer, k_test=5, batch_size=2)
    for name in ("sims", "i2t", "t2i"):
        assert np.array_equal(getattr(one, name), getattr(scores_8, name)), name


def test_k_test_0_gives_itc_sims(hf_dir, models, data, tokenizer, scores_8):
    model, mesh = models[8]
    out = retrieval_scores(model, mesh, *data, tokenizer, k_test=0, batch_size=2)
    np.testing.assert_array_equal(out.sims, scores_8.sims)
    np.testing.assert_array_equal(out.i2t, out.sims)
    np.testing.assert_array_equal(out.t2i, out.sims.T)


def test_rejects_generation_model_and_empty_inputs(tmp_path, models, data, tokenizer):
    ref.generation_model(ref.OPT).save_pretrained(tmp_path)
    mesh = models[1][1]
    with pytest.raises(ValueError, match="Blip2ForConditionalGeneration"):
        retrieval_scores(load_model(tmp_path, mesh), mesh, *data, tokenizer, k_test=5)
    model = models[1][0]
    with pytest.raises(ValueError, match="0 texts"):
        retrieval_scores(model, mesh, data[0], [], tokenizer, k_test=5)
    with pytest.raises(ValueError, match="0 images"):
        retrieval_scores(model, mesh, [], data[1], tokenizer, k_test=5)


def test_k_test_beyond_the_data_reranks_every_pair(hf_dir, models, data, tokenizer):
    model, mesh = models[8]
    out = retrieval_scores(model, mesh, *data, tokenizer, k_test=64, batch_size=2, itm_batch_size=3)
    _, i2t, t2i = _torch_scores(hf_dir, data, tokenizer, k_test=64)
    assert (out.i2t != UNRANKED).all() and (out.t2i != UNRANKED).all()
    np.testing.assert_allclose(out.i2t, i2t, rtol=0, atol=1e-5)
    np.testing.assert_allclose(out.t2i, t2i, rtol=0, atol=1e-5)
    np.testing.assert_allclose(out.i2t, out.t2i.T, rtol=0, atol=1e-6)  # a pair in both lists has one score
