"""Evaluation metrics against independent references: answers worked out by hand from the official
VQA script's code, COCOEvalCap run as LAVIS runs it, and a brute-force count for retrieval ranks."""
import concurrent.futures
import json
import shutil

import numpy as np
import pytest

from blip2_jax.evaluate.metrics import (caption_metrics, exact_match, normalize_vqa_answer, retrieval_metrics,
                                    vqa_accuracy, vqa_score)

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="the PTB tokenizer and METEOR need java")


# Expected values traced through vqaEval.py by hand: processPunctuation deletes a mark that touches a
# space (or any mark when the text has digit,digit) and otherwise turns it into a space; the period
# regex deletes every '.' not followed by a digit, at most 32 of them; processDigitArticle lowercases,
# maps number words, drops a/an/the, restores apostrophes, and collapses whitespace.
@pytest.mark.parametrize("answer, expected", [
    ("Two dogs.", "2 dogs"),
    ("the cat", "cat"),
    ("An Apple", "apple"),
    ("a", ""),
    ("dont", "don't"),
    ("Isnt it?", "isn't it"),       # '?' -> ' ', then the contraction is restored after lowercasing
    ("Im here", "im here"),         # the table's "Im" key can never match a lowercased word
    ("it's", "it's"),               # apostrophes are not punctuation to the script
    ("yes!", "yes"),
    ("3.5", "3.5"),                 # a period before a digit stays
    ("1.5.", "1.5"),
    ("2.", "2"),
    ("u.s.a.", "usa"),
    ("ok. yes", "ok yes"),
    ("1,000", "1000"),              # digit,digit: every mark is deleted, not spaced
    ("10,000 dollars!", "10000 dollars"),
    ("red,blue", "red blue"),
    ("red, blue", "red blue"),      # ', ' present: the comma is deleted, the space stays
    ("yes / no", "yes no"),
    ("x-ray", "x ray"),
    ("(red)", "red"),
    ("none", "0"),
    ("one two three Ten", "1 2 3 10"),
    (" \tA Dog\n", "dog"),
    ("." * 40, "." * 8),            # re.UNICODE (32) passed as `count`: only 32 periods go
])
def test_normalize_vqa_answer(answer, expected):
    assert normalize_vqa_answer(answer) == expected


def _ten(matching: int, answer: str = "2") -> list[str]:
    return [answer] * matching + ["3", "4", "5", "6", "7", "8", "9", "10", "11", "12"][: 10 - matching]


# Leave-one-out mean of min(1, matches among the other 9 / 3), m matching answers out of 10:
#   m=1: (1*0/3 + 9*1/3) / 10 = 3/10 = 0.3
#   m=2: (2*1/3 + 8*2/3) / 10 = (2/3 + 16/3) / 10 = 0.6
#   m=3: (3*2/3 + 7*1) / 10 = (2 + 7) / 10 = 0.9
#   m=4: (4*1 + 6*1) / 10 = 1.0
@pytest.mark.parametrize("matching, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_ten_answers(matching, expected):
    assert vqa_accuracy("Two.", _ten(matching)) == pytest.approx(expected, abs=1e-12)


def test_vqa_accuracy_answers_get_only_punctuation_processing():
    # Mixed answers: "x-ray" -> "x ray" (punctuation only), the prediction too -> 3 matches -> 0.9.
    assert vqa_accuracy("x-ray", ["x-ray"] * 3 + ["xray"] * 7) == pytest.approx(0.9)
    # All identical: the script leaves them raw, so "x-ray" never equals the prediction's "x ray".
    assert vqa_accuracy("x-ray", ["x-ray"] * 10) == 0.0
    # Answers are not lowercased, nor number words mapped (VQAv2's answers are stored normalised).
    assert vqa_accuracy("yes", ["Yes"] * 5 + ["no"] * 5) == 0.0
    assert vqa_accuracy("two", ["two"] * 5 + ["no"] * 5) == 0.0
    # "yes!" -> "yes " (processPunctuation does not strip), which is not "yes".
    assert vqa_accuracy("yes", ["yes!"] * 4 + ["no"] * 6) == 0.0
    # The prediction is fully normalised: identical answers match it in the raw form.
    assert vqa_accuracy("  Yes.\n", ["yes"] * 10) == 1.0


def test_single_answer_is_exact_match():
    # The official formula has no other answers to count with one reference: it would give 0.
    assert vqa_accuracy("Two", ["2"]) == 1.0
    assert vqa_accuracy("three", ["2"]) == 0.0
    assert exact_match("The Cat.", ["cat"]) == 1.0
    assert exact_match("dog", ["cat", "A dog"]) == 1.0
    assert exact_match("dogs", ["dog"]) == 0.0


def test_vqa_score():
    predictions = {1: "two", 2: "no", "q3": "Red"}
    answers = {1: _ten(2), 2: ["no"] * 10, "q3": ["blue"]}
    assert vqa_score(predictions, answers) == {"accuracy": pytest.approx((0.6 + 1.0 + 0.0) / 3), "count": 3}
    gqa = vqa_score({1: "the red one", 2: "Yes"}, {1: ["red 1"], 2: ["no"]}, metric="exact_match")
    assert gqa == {"accuracy": 0.5, "count": 2}


def test_vqa_errors():
    with pytest.raises(ValueError, match=r"have no prediction: 'q2'"):
        vqa_score({"q1": "yes"}, {"q1": ["yes"], "q2": ["no"]})
    with pytest.raises(ValueError, match=r"not in the references: 7"):
        vqa_score({"q1": "yes", 7: "no"}, {"q1": ["yes"]})
    with pytest.raises(ValueError, match="metric must be one of"):
        vqa_score({"q1": "yes"}, {"q1": ["yes"]}, metric="bleu")
    with pytest.raises(ValueError, match="list of strings"):
        vqa_accuracy("yes", "yes")
    with pytest.raises(ValueError, match="empty"):
        vqa_accuracy("yes", [])


# Six images, two to five references each; predictions with capitals and punctuation for the
# PTB tokenizer to lowercase and strip.
CAPTION_REFS = {
    101: ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave in the ocean",
          "a person on a surfboard riding a wave"],
    102: ["Two dogs playing with a frisbee in the park.", "Two dogs run across the grass after a frisbee"],
    103: ["A plate of food with broccoli and rice.", "a dinner plate with rice, broccoli and chicken",
          "A white plate topped with rice and vegetables.", "Food on a plate: rice and broccoli",
          "a healthy meal of chicken rice and broccoli"],
    104: ["A red double decker bus driving down a street.", "a red bus on a city street",
          "A double-decker bus in London"],
    105: ["a cat sleeping on a laptop keyboard", "A cat lies on top of an open laptop.",
          "The cat is napping on the computer", "a grey cat on a laptop"],
    106: ["A kitchen with white cabinets and a stove.", "an empty kitchen with a stove and a fridge"],
}
CAPTION_PREDICTIONS = {
    101: "A man riding a wave on a surfboard.",
    102: "Two dogs playing with a Frisbee!",
    103: "A plate of rice, broccoli and chicken.",
    104: "A red bus driving down the street",
    105: "A cat sleeping on a laptop.",
    106: "a kitchen with a stove and a refrigerator",
}


class _NoSpice:
    """Stands in for SPICE inside COCOEvalCap.evaluate (SPICE downloads CoreNLP; the test is offline)."""

    def compute_score(self, gts, res):
        return 0.0, [0.0] * len(gts)

    def method(self):
        return "SPICE"


# After PTB tokenization (lowercase, punctuation tokens dropped) every prediction equals each of its
# references: all n-gram precisions are 1 and the lengths equal, so BLEU-n = 1 (up to pycocoevalcap's
# 1e-15/1e-9 smoothing) and the longest common subsequence is the whole caption (ROUGE-L = 1).
IDENTICAL_REFS = {1: ["a dog running on the grass", "A dog running on the grass."],
                  2: ["two red buses parked by a building"]}
IDENTICAL_PREDICTIONS = {1: "A Dog, running on the GRASS!", 2: "Two red buses parked by a building."}


def _coco_eval_cap(root, predictions, references):
    """LAVIS's `coco_caption_eval`: COCO-format files, pycocotools, COCOEvalCap (SPICE stubbed)."""
    import pycocoevalcap.eval
    from pycocoevalcap.eval import COCOEvalCap
    from pycocotools.coco import COCO

    pairs = [(i, c) for i, refs in references.items() for c in refs]
    (root / "gt.json").write_text(json.dumps({
        "images": [{"id": i} for i in references],
        "annotations": [{"image_id": i, "id": n, "caption": c} for n, (i, c) in enumerate(pairs)]}))
    (root / "res.json").write_text(json.dumps([{"image_id": i, "caption": c} for i, c in predictions.items()]))
    coco = COCO(str(root / "gt.json"))
    result = coco.loadRes(str(root / "res.json"))
    evaluator = COCOEvalCap(coco, result)
    evaluator.params["image_id"] = result.getImgIds()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pycocoevalcap.eval, "Spice", _NoSpice)
        evaluator.evaluate()
    return {k: v for k, v in evaluator.eval.items() if k != "SPICE"}


@pytest.fixture(scope="module")
def caption_runs(tmp_path_factory):
    """Ours on both fixtures and COCOEvalCap on the first, once per module and side by side: each
    run starts METEOR's JVM, which takes seconds to load its paraphrase table."""
    root = tmp_path_factory.mktemp("coco")
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        ours = pool.submit(caption_metrics, CAPTION_PREDICTIONS, CAPTION_REFS)
        identical = pool.submit(caption_metrics, IDENTICAL_PREDICTIONS, IDENTICAL_REFS)
        reference = pool.submit(_coco_eval_cap, root, CAPTION_PREDICTIONS, CAPTION_REFS)
        return {"ours": ours.result(), "reference": reference.result(), "identical": identical.result()}


@needs_java
def test_caption_metrics_match_coco_eval_cap(caption_runs):
    ours = caption_runs["ours"]
    assert set(ours) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    assert ours == pytest.approx(caption_runs["reference"], rel=1e-12, abs=1e-12)
    assert 0.0 < ours["Bleu_4"] < ours["Bleu_1"] < 1.0 and ours["CIDEr"] > 0.5


@needs_java
def test_caption_identical_after_tokenization_is_perfect(caption_runs):
    scores = caption_runs["identical"]
    for n in range(1, 5):
        assert scores[f"Bleu_{n}"] == pytest.approx(1.0, abs=1e-6)
    assert scores["ROUGE_L"] == pytest.approx(1.0, abs=1e-12)


def test_caption_errors(monkeypatch):
    with pytest.raises(ValueError, match=r"have no prediction: 102"):
        caption_metrics({101: "a cat"}, {101: ["a cat"], 102: ["a dog"]})
    with pytest.raises(ValueError, match=r"not in the references: 'x'"):
        caption_metrics({101: "a cat", "x": "a dog"}, {101: ["a cat"]})
    with pytest.raises(ValueError, match=r"image 102 needs a non-empty list"):
        caption_metrics({101: "a cat", 102: "a dog"}, {101: ["a cat"], 102: []})
    monkeypatch.setenv("PATH", "")
    with pytest.raises(RuntimeError, match="java"):
        caption_metrics({101: "a cat"}, {101: ["a cat"]})


def _brute_force_recalls(score_i2t, score_t2i, img2txt, txt2img):
    """Rank = how many entries score strictly higher, plus equal ones at a lower index (the documented
    tie rule); recall@k = percent of ranks below k."""
    def rank(row, target):
        return sum(1 for s in range(len(row)) if row[s] > row[target] or (row[s] == row[target] and s < target))

    txt = [min(rank(score_i2t[i], t) for t in texts) for i, texts in enumerate(img2txt)]
    img = [rank(score_t2i[t], i) for t, i in enumerate(txt2img)]
    out = {}
    for prefix, ranks in (("txt", txt), ("img", img)):
        for k in (1, 5, 10):
            out[f"{prefix}_r{k}"] = 100.0 * sum(r < k for r in ranks) / len(ranks)
        out[f"{prefix}_r_mean"] = (out[f"{prefix}_r1"] + out[f"{prefix}_r5"] + out[f"{prefix}_r10"]) / 3
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    out["agg_metrics"] = out["txt_r_mean"]
    return out


@pytest.mark.parametrize("decimals", [None, 1])  # continuous scores, and scores with many ties
def test_retrieval_matches_brute_force(decimals):
    rng = np.random.default_rng(0)
    n_images, per_image = 20, 5
    txt2img = rng.permutation(np.repeat(np.arange(n_images), per_image))
    img2txt = [list(np.flatnonzero(txt2img == i)) for i in range(n_images)]
    # Make the right pairs a bit likelier to score high, so every recall is strictly between 0 and 100.
    signal = 1.5 * (txt2img[None, :] == np.arange(n_images)[:, None])
    score_i2t = rng.normal(size=(n_images, n_images * per_image)) + signal
    score_t2i = rng.normal(size=(n_images * per_image, n_images)) + signal.T
    if decimals is not None:
        score_i2t, score_t2i = np.round(score_i2t, decimals), np.round(score_t2i, decimals)
    ours = retrieval_metrics(score_i2t, score_t2i, img2txt, txt2img)
    reference = _brute_force_recalls(score_i2t, score_t2i, img2txt, txt2img)
    assert ours == pytest.approx(reference, abs=1e-9)
    assert 0 < ours["txt_r1"] < 100 and 0 < ours["img_r1"] < 100


def test_retrieval_perfect_diagonal():
    txt2img = np.repeat(np.arange(5), 5)
    score_i2t = (txt2img[None, :] == np.arange(5)[:, None]).astype(np.float32)
    img2txt = [range(5 * i, 5 * i + 5) for i in range(5)]
    ours = retrieval_metrics(score_i2t, score_i2t.T, img2txt, list(txt2img))
    assert ours == {k: 100.0 for k in ("txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5",
                                       "img_r10", "img_r_mean", "r_mean", "agg_metrics")}


def test_retrieval_ties_go_to_the_lower_index():
    # All scores equal: the ranking is the index order. Images' best texts sit at 0, 2, 4 (R@1 1/3,
    # R@5 all); texts' images sit at 0, 0, 1, 1, 2, 2 (R@1 2/6, R@5 all).
    ours = retrieval_metrics(np.zeros((3, 6)), np.zeros((6, 3)), [[1, 0], [2, 3], [5, 4]], [0, 0, 1, 1, 2, 2])
    assert ours["txt_r1"] == pytest.approx(100 / 3) and ours["txt_r5"] == 100.0
    assert ours["img_r1"] == pytest.approx(100 / 3) and ours["img_r5"] == 100.0


def test_retrieval_errors():
    i2t, img2txt, txt2img = np.zeros((20, 100)), [[i] for i in range(20)], [0] * 100
    with pytest.raises(ValueError, match=r"\(100, 20\).*got shape \(20, 100\)"):
        retrieval_metrics(i2t, i2t, img2txt, txt2img)
    with pytest.raises(ValueError, match=r"got shape \(100,\)"):
        retrieval_metrics(np.zeros(100), i2t.T, img2txt, txt2img)
    with pytest.raises(ValueError, match=r"one entry per image \(20\), got 19"):
        retrieval_metrics(i2t, i2t.T, img2txt[:-1], txt2img)
    with pytest.raises(ValueError, match=r"one entry per text \(100\), got 99"):
        retrieval_metrics(i2t, i2t.T, img2txt, txt2img[:-1])
    with pytest.raises(ValueError, match=r"img2txt\[3\]"):
        retrieval_metrics(i2t, i2t.T, img2txt[:3] + [[100]] + img2txt[4:], txt2img)
    with pytest.raises(ValueError, match=r"txt2img must hold image indices in \[0, 20\)"):
        retrieval_metrics(i2t, i2t.T, img2txt, [20] + txt2img[1:])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(np.full((20, 100), np.nan), i2t.T, img2txt, txt2img)
