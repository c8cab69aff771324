"""`blip2-jax eval` end to end on tiny random checkpoints and small LAVIS-format sets: every sample
evaluated once on any mesh, results files bit-identical on 1 and 8 devices (set sizes that no
global batch divides), answers and captions equal to the single-device generation API (itself
checked against `transformers.generate`), metrics equal to the metric functions on those texts."""
import json

import numpy as np
import pytest
from PIL import Image

from blip2_jax.data import easy_vqa
from blip2_jax.evaluate import datasets, metrics
from blip2_jax.evaluate.batches import EvalBatches
from blip2_jax.evaluate.config import base_config, set_generation
from blip2_jax.evaluate.run import evaluate
from blip2_jax.generation.api import Blip2Generator
from blip2_jax.generation.config import GenerationConfig
from tests.reference import hf_models as ref
from tests.reference.tokenizers import tiny_opt_tokenizer

SEARCH = GenerationConfig(num_beams=2, max_new_tokens=4, min_new_tokens=1)
QUESTIONS = ["what is the w1", "w2 w3", "is w4 w5 w6 the w7", "w8", "a photo"]


@pytest.mark.parametrize("n,per_device,devices", [(11, 2, 8), (16, 2, 8), (5, 3, 1), (1, 4, 2)])
def test_batches_cover_every_sample_once(n, per_device, devices):
    batches = EvalBatches(n, per_device * devices)
    rows = [batches.rows(b) for b in range(len(batches))]
    seen = np.concatenate([index[valid] for index, valid in rows])
    assert sorted(seen.tolist()) == list(range(n))  # nothing dropped, nothing twice
    assert len(batches) == -(-n // (per_device * devices))
    assert all(len(index) == per_device * devices for index, _ in rows)  # static shapes
    assert all(np.array_equal(local, batches.rows(b)[0]) for b, (_, local) in enumerate(batches))  # 1 host


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """A tiny OPT BLIP-2 (HF directory with its tokenizer) and LAVIS-style VQA / caption files."""
    root = tmp_path_factory.mktemp("eval")
    ref.generation_model(ref.OPT, seed=5).save_pretrained(root / "model")
    tiny_opt_tokenizer().save_pretrained(root / "model")
    rng = np.random.default_rng(1)
    for i in range(7):
        Image.fromarray(rng.integers(0, 256, (24 + 3 * i, 30, 3), dtype=np.uint8)).save(root / f"{i}.png")
    vqa = [{"question_id": 100 + q, "image": f"{q % 7}.png", "question": QUESTIONS[q % 5],
            "answer": ["w1"] * 6 + ["w2"] * 4} for q in range(11)]
    captions = [{"image": f"{i}.png", "image_id": i, "caption": ["w1 w2 w3", "a photo of w4"]} for i in range(7)]
    (root / "vqa.json").write_text(json.dumps(vqa))
    (root / "captions.json").write_text(json.dumps(captions))
    return root


def _config(task, root, annotations, devices):
    c = base_config(task)
    c.checkpoint, c.num_devices, c.batch_size = str(root / "model"), devices, 2
    c.data.update(annotations=str(root / annotations), image_root=str(root))
    set_generation(c, SEARCH)
    return c


@pytest.fixture(scope="module")
def vqa_runs(sets, tmp_path_factory):
    """The VQA preset's run on 1 and on 8 devices: (config, output directory) each."""
    out = {}
    for devices in (1, 8):
        c = _config("vqa", sets, "vqa.json", devices)
        c.prompt = "Question: {} Answer:"
        out[devices] = (c, tmp_path_factory.mktemp(f"vqa{devices}"))
        evaluate(c, out[devices][1])
    return out


def test_results_files_bit_identical_on_1_and_8_devices(vqa_runs):
    for name in ("results.json", "metrics.json"):
        assert (vqa_runs[1][1] / name).read_bytes() == (vqa_runs[8][1] / name).read_bytes()


def test_vqa_answers_equal_the_generation_api(vqa_runs, sets):
    c, out = vqa_runs[8]
    results = json.loads((out / "results.json").read_text())
    data = datasets.vqa_set(c.data)
    assert [r["question_id"] for r in results] == list(range(100, 111))  # the set's order, each once
    api = Blip2Generator.from_pretrained(sets / "model", batch_size=4)
    expected = api.answer(data.images, data.questions, c.prompt, SEARCH)
    assert [r["answer"] for r in results] == expected
    score = json.loads((out / "metrics.json").read_text())
    want = metrics.vqa_score(dict(enumerate(expected)), dict(enumerate(data.answers)))
    assert score["accuracy"] == pytest.approx(want["accuracy"]) and score["count"] == 11


def test_caption_eval_equals_api_captions_and_their_metrics(sets, tmp_path):
    pytest.importorskip("pycocoevalcap")
    c = _config("caption", sets, "captions.json", 8)
    c.prompt = "a photo of"
    scores = evaluate(c, tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    data = datasets.caption_set(c.data)
    api = Blip2Generator.from_pretrained(sets / "model", batch_size=4)
    expected = api.caption(data.images, c.prompt, SEARCH)
    assert [r["caption"] for r in results] == expected and [r["image_id"] for r in results] == list(range(7))
    want = metrics.caption_metrics(dict(enumerate(expected)), dict(enumerate(data.references)))
    assert scores == pytest.approx(want)


def test_bad_annotations_are_named(sets, tmp_path):
    c = _config("vqa", sets, "missing.json", 1)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        datasets.vqa_set(c.data)
    (tmp_path / "bad.json").write_text(json.dumps([{"image": "0.png", "question": "w1"}]))
    c.data.annotations = str(tmp_path / "bad.json")
    with pytest.raises(KeyError, match="question_id"):
        datasets.vqa_set(c.data)
    c = _config("retrieval", sets, "vqa.json", 1)  # the set is read first: VQA records have no captions
    with pytest.raises(KeyError, match=r"record 0 has none of \['caption'\]"):
        evaluate(c)
    c = _config("retrieval", sets, "captions.json", 1)
    with pytest.raises(ValueError, match="ITC/ITM heads"):
        evaluate(c)


def test_easy_vqa_captions_agree_with_every_answer():
    """The captions inferred from the answers contradict none of them (property over both splits)."""
    import easy_vqa as package  # pylint: disable=import-outside-toplevel

    for split, get in (("train", package.get_train_questions), ("test", package.get_test_questions)):
        known = easy_vqa.attributes(split)
        for question, answer, image in zip(*get()):
            if image not in known:
                continue
            color, shape = known[image]
            if answer in easy_vqa.COLORS:
                assert answer == color, (split, image, question)
            if answer in easy_vqa.SHAPES:
                assert answer == shape, (split, image, question)
            words = question.replace("?", "").split()
            named = [w for w in words if w in easy_vqa.COLORS + easy_vqa.SHAPES]
            if answer in ("yes", "no") and named:
                present = named[0] in (color, shape)
                negated = " not " in f" {question} " or " no " in f" {question} "
                assert (answer == "yes") == (present != negated), (split, image, question)
    assert len(easy_vqa.attributes("train")) == 3542 and len(easy_vqa.attributes("test")) == 880


@pytest.mark.parametrize("file,presets", [
    ("caption.py", ["coco_opt2.7b", "coco_flant5xl", "nocaps_opt6.7b"]),
    ("vqa.py", ["vqav2_opt2.7b", "okvqa_flant5xxl", "gqa_flant5xl", "easy_vqa"]),
    ("retrieval.py", ["coco", "flickr", "easy_vqa"]),
    ("instruct.py", ["nocaps_vicuna7b", "flickr_flant5xxl", "gqa_vicuna13b", "vizwiz_flant5xl", "textvqa_vicuna7b",
                      "scienceqa_flant5xxl"])])
def test_eval_config_presets_load(file, presets):
    """Every preset builds, with a generation setting GenerationConfig accepts and a known task."""
    import importlib.util  # pylint: disable=import-outside-toplevel
    from pathlib import Path  # pylint: disable=import-outside-toplevel

    spec = importlib.util.spec_from_file_location(file, Path(__file__).parent.parent / "configs" / "eval" / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for preset in presets:
        config = module.get_config(preset)
        GenerationConfig(**config.generation.to_dict())
        assert config.task in ("caption", "vqa", "choice", "retrieval") and (config.checkpoint or preset == "easy_vqa")
    with pytest.raises(KeyError, match="presets"):
        module.get_config("nonsense")
