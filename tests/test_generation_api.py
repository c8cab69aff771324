"""The text API and `blip2-jax generate` on a tiny random checkpoint saved with a word-level tokenizer:
captions equal `transformers.generate` on the inputs Blip2Processor builds, chunking and prompt
buckets change neither the texts nor the number of compiles, and bad inputs are named."""
import shutil

import numpy as np
import pytest
import torch
import transformers
from absl import app
from PIL import Image

from blip2_jax import cli
from blip2_jax.data.images import CLIP_MEAN, CLIP_STD, load_image, preprocess_images
from blip2_jax.generation.api import Blip2Generator
from blip2_jax.generation.config import CAPTION, VQA_OPT, GenerationConfig
from tests.reference import hf_models as ref
from tests.reference.tokenizers import tiny_opt_tokenizer

# What `blip2-jax generate --semantics transformers --num_beams 3 --max_new_tokens 8 --min_new_tokens 2` runs.
CONFIG = GenerationConfig(num_beams=3, max_new_tokens=8, min_new_tokens=2)
CLI_SEARCH = ["--semantics", "transformers", "--num_beams", "3", "--max_new_tokens", "8", "--min_new_tokens", "2"]
# 4, 1, 7 and 8, 2 tokens with BOS: one prompt bucket (8), different longest prompts per call.
PROMPTS = ["a photo of", "", "what is the w1 w2 w3", "w4 w5 w6 w7 w8 w9 w10", "a"]
BATCH = 4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    directory = tmp_path_factory.mktemp("blip2_opt")
    hf = ref.generation_model(ref.OPT, seed=3)
    hf.save_pretrained(directory)
    tiny_opt_tokenizer().save_pretrained(directory)
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(41, 23), (30, 30), (17, 52), (64, 48),
                                                                           (33, 35)]]
    png = directory / "first.png"
    Image.fromarray(arrays[0]).save(png)
    # Every input kind: a path, a PIL image (greyscale: converted to RGB) and arrays.
    images = [str(png), Image.fromarray(arrays[1]).convert("L")] + arrays[2:]
    return dict(dir=directory, hf=hf, images=images, png=str(png))


@pytest.fixture(scope="module")
def generator(ckpt):
    return Blip2Generator.from_pretrained(ckpt["dir"], batch_size=BATCH)


@pytest.fixture(scope="module")
def three(generator, ckpt):
    """Captions of the first three images, one prompt each (one padded chunk of 4)."""
    return generator.caption(ckpt["images"][:3], PROMPTS[:3], CONFIG)


def test_captions_equal_transformers_generate_on_blip2processor_inputs(ckpt, three):
    tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt["dir"], padding_side="left")
    processor = transformers.Blip2Processor(transformers.BlipImageProcessorPil(size={"height": 30, "width": 30}),
                                            tokenizer, num_query_tokens=ref.NUM_QUERY_TOKENS)
    inputs = processor(images=[load_image(x) for x in ckpt["images"][:3]], text=PROMPTS[:3], padding=True,
                       return_tensors="pt")
    assert (inputs["input_ids"][:, :ref.NUM_QUERY_TOKENS] == ref.IMAGE_TOKEN_INDEX).all()
    with torch.no_grad():
        out = ckpt["hf"].generate(**inputs, num_beams=3, max_new_tokens=8, min_new_tokens=2, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1]:]
    expected = [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    assert three == expected
    assert len(set(expected)) > 1 and all(expected)  # not a degenerate comparison


def test_chunks_and_prompt_buckets_change_neither_texts_nor_compiles(generator, ckpt, three):
    """5 images in chunks of 4 (the last padded) reuse the compile of the 3-image call; its longest
    prompt differs but lies in the same bucket."""
    compiled = generator._compiled[CONFIG]  # pylint: disable=protected-access
    before = compiled._cache_size()  # pylint: disable=protected-access
    images = ckpt["images"]
    texts = generator.caption(images, PROMPTS, CONFIG)
    assert compiled._cache_size() == before  # pylint: disable=protected-access
    assert texts[:3] == three
    per_chunk = generator.caption(images[:BATCH], PROMPTS[:BATCH], CONFIG) + \
        generator.caption(images[BATCH:], PROMPTS[BATCH:], CONFIG)
    assert texts == per_chunk


def test_answer_formats_the_question_into_the_prompt(generator, ckpt, monkeypatch):
    images = ckpt["images"][:3]
    questions = ["w1 ?", "what", "is w2"]
    assert generator.answer(images, questions, config=CONFIG) == \
        generator.caption(images, [f"Question: {q} Answer:" for q in questions], CONFIG)
    assert generator.answer(images, "w3", prompt="what is {} ?", config=CONFIG) == \
        generator.caption(images, "what is w3 ?", CONFIG)
    seen = {}  # the defaults, without compiling the paper's VQA search
    monkeypatch.setattr(generator, "generate", lambda images, prompts, config, rng: seen.update(
        prompts=prompts, config=config) or [])
    generator.answer(images[:2], ["w1", "w2"])
    assert seen == {"prompts": ["Question: w1 Answer:", "Question: w2 Answer:"], "config": VQA_OPT}


def test_cli_prints_path_and_the_api_caption(ckpt, three, capsys):
    argv = ["blip2-jax", "generate", "--checkpoint", str(ckpt["dir"]), "--image", ckpt["png"], "--prompt",
            PROMPTS[0]] + CLI_SEARCH
    cli.main(argv)
    assert capsys.readouterr().out == f"{ckpt['png']}\t{three[0]}\n"
    with pytest.raises(app.UsageError, match="--checkpoint"):
        cli.main(["blip2-jax", "generate", "--image", ckpt["png"]])


def test_bad_inputs_are_named(generator, ckpt, tmp_path):
    missing = tmp_path / "missing.jpg"
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        generator.caption([ckpt["png"], missing], config=CAPTION)
    with pytest.raises(ValueError, match="uint8"):
        generator.caption([np.zeros((8, 8, 3), np.float32)], config=CAPTION)
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        generator.caption(ckpt["images"][:3], ["a", "b"], CONFIG)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(ckpt["dir"] / name, tmp_path / name)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} has no tokenizer"):
        Blip2Generator.from_pretrained(tmp_path)


def test_preprocess_is_bicubic_resize_then_clip_normalisation(ckpt):
    image = np.random.default_rng(1).integers(0, 256, (37, 23, 3), dtype=np.uint8)
    resized = np.asarray(Image.fromarray(image).resize((30, 30), Image.BICUBIC), np.float64)
    expected = (resized / 255 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
    got = preprocess_images([image], 30)
    assert got.shape == (1, 30, 30, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got[0], expected, atol=1e-6)
    png = np.asarray(Image.open(ckpt["png"]))  # a path and its array give the same pixels
    np.testing.assert_array_equal(preprocess_images([ckpt["png"]], 30), preprocess_images([png], 30))
    twice = preprocess_images([ckpt["png"], image, ckpt["png"]], 30)  # a file named twice: read once, both rows
    once = preprocess_images([png], 30)
    np.testing.assert_array_equal(twice, np.concatenate([once, got, once]))
