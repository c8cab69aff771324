"""The scores BLIP-2 is reported with, computed as the official tools compute them.

- VQA accuracy: the VQAv2 evaluation script (GT-Vision-Lab/VQA `vqaEval.py`, which LAVIS copies),
  quirks included: the prediction is fully normalised but the human answers only have their
  punctuation processed, and only when they are not all identical; the period regex strips every
  '.' not followed by a digit (its "lookbehind" is a typo) and at most 32 of them (the script
  passes `re.UNICODE` as `count`).
- Captioning: `pycocoevalcap` as LAVIS's `coco_caption_eval` runs it (PTB tokenizer, then BLEU-1..4,
  METEOR, ROUGE-L, CIDEr(-D), optionally SPICE); values are on pycocoevalcap's scale (papers
  report them x100).
- Retrieval: LAVIS's `itm_eval` recall@k over the image-to-text and text-to-image score matrices.

Pure Python/numpy; the caption metrics need the `eval` extra (`pycocoevalcap`) and `java`.
"""
from __future__ import annotations

import re
import shutil
from typing import Callable, Hashable, Mapping, Sequence

import numpy as np

# The official tables (vqaEval.py). Keys with capitals ("Im", "Ive", ...) can never match, since
# words are lowercased before the lookup; they are kept so the table is the script's.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = ("a", "an", "the")
# Apostrophes, colons and periods are not here: apostrophes stay, periods have their own rule.
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
               "`", ",", "?", "!")
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
PERIOD_STRIP_COUNT = 32  # the script's `sub("", text, re.UNICODE)`: re.UNICODE == 32 is the count
IDS_SHOWN = 10


def _process_punctuation(text: str) -> str:
    """vqaEval.py `processPunctuation`: a mark is deleted when the original text has it next to a
    space, or has a digit-comma-digit anywhere; otherwise it becomes a space."""
    out = text
    delete = COMMA_STRIP.search(text) is not None
    for mark in PUNCTUATION:
        out = out.replace(mark, "" if delete or mark + " " in text or " " + mark in text else " ")
    return PERIOD_STRIP.sub("", out, count=PERIOD_STRIP_COUNT)


def _process_digit_article(text: str) -> str:
    """vqaEval.py `processDigitArticle`: lowercase, number words to digits, articles dropped,
    missing apostrophes restored, whitespace collapsed."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalize_vqa_answer(answer: str) -> str:
    """An answer as the official VQA evaluation normalises a prediction: newlines and tabs to
    spaces, stripped, then punctuation and digit/article processing."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def _answer_list(answers: Sequence[str]) -> list[str]:
    # A bare string is a Sequence[str] too, and would be scored character by character.
    if isinstance(answers, str):
        raise ValueError(f"answers must be a list of strings, got the string {answers!r:.80}")
    if len(answers) == 0:
        raise ValueError("answers is empty: a question needs at least one reference answer")
    return list(answers)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals one of the normalised answers, else 0.0 (GQA,
    easy-VQA: one reference answer). LAVIS's GQA task normalises only the prediction, so there a
    stored answer that normalisation would change (e.g. "t-shirt") can never match; here both are."""
    predicted = normalize_vqa_answer(prediction)
    return float(any(predicted == normalize_vqa_answer(a) for a in _answer_list(answers)))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The official VQA accuracy of one prediction against its human answers (VQAv2: 10).

    Each answer is left out in turn and the prediction scores min(1, matches among the others / 3);
    the result is the mean over the answers, so 1, 2, 3, 4+ matching answers out of 10 give 0.3,
    0.6, 0.9, 1.0. As in the script, the answers are compared with only their punctuation
    processed (not lowercased, no digit/article step), and only when they are not all identical.
    The formula is meant for many annotators: with one answer there are no others and it is always
    0, so a single answer is scored by `exact_match` instead.
    """
    answers = _answer_list(answers)
    if len(answers) == 1:
        return exact_match(prediction, answers)
    predicted = normalize_vqa_answer(prediction)
    if len(set(answers)) > 1:
        answers = [_process_punctuation(a) for a in answers]
    matches = [a == predicted for a in answers]
    total = sum(matches)
    return sum(min(1.0, (total - match) / 3) for match in matches) / len(matches)


def _shown(ids: list[Hashable]) -> str:
    ids = sorted(ids, key=repr)
    more = f" and {len(ids) - IDS_SHOWN} more" if len(ids) > IDS_SHOWN else ""
    return ", ".join(repr(i) for i in ids[:IDS_SHOWN]) + more


def _check_keys(predictions: Mapping, references: Mapping, what: str) -> None:
    """Raise naming the ids that only one side has: a partial result would be scored silently."""
    missing = [k for k in references if k not in predictions]
    extra = [k for k in predictions if k not in references]
    problems = []
    if missing:
        problems.append(f"{len(missing)} {what} ids have no prediction: {_shown(missing)}")
    if extra:
        problems.append(f"{len(extra)} predicted ids are not in the references: {_shown(extra)}")
    if problems:
        raise ValueError("; ".join(problems))
    if not predictions:
        raise ValueError(f"no {what}s to score")


def vqa_score(predictions: Mapping[Hashable, str], answers: Mapping[Hashable, Sequence[str]],
              metric: str = "vqa") -> dict[str, float]:
    """{"accuracy": mean per-question score as a fraction in [0, 1], "count": questions scored}.

    `metric` is "vqa" (`vqa_accuracy`, VQAv2/OK-VQA) or "exact_match" (GQA). The official script
    reports 100x the accuracy rounded to 2 decimals; this is the unrounded fraction.
    """
    scorers: dict[str, Callable[[str, Sequence[str]], float]] = {
        "vqa": vqa_accuracy, "exact_match": exact_match}
    if metric not in scorers:
        raise ValueError(f"metric must be one of {sorted(scorers)}, got {metric!r}")
    _check_keys(predictions, answers, "question")
    scores = [scorers[metric](predictions[k], answers[k]) for k in answers]
    return {"accuracy": float(np.mean(scores)), "count": len(scores)}


def caption_metrics(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]],
                    spice: bool = False) -> dict[str, float]:
    """Corpus caption scores as LAVIS's `coco_caption_eval` (COCOEvalCap) computes them.

    Predictions and references are PTB-tokenized (lowercased, punctuation tokens dropped), then
    scored with Bleu_1..Bleu_4, METEOR, ROUGE_L, CIDEr and, with `spice=True`, SPICE. The tokenizer,
    METEOR and SPICE are Java programs; SPICE also needs Stanford CoreNLP, which pycocoevalcap
    downloads on its first use (so not offline), and an 8 GB Java heap.
    """
    _check_keys(predictions, references, "image")
    for key, refs in references.items():
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"image {key!r} needs a non-empty list of reference captions, got {refs!r:.80}")
    if shutil.which("java") is None:
        raise RuntimeError("caption_metrics needs `java` on PATH: pycocoevalcap's PTB tokenizer and "
                           "METEOR (and SPICE) are Java programs; install a JRE, e.g. "
                           "`apt-get install default-jre-headless`")
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError as e:
        raise ImportError("caption_metrics needs pycocoevalcap: pip install 'blip2_jax[eval]'") from e

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in references[k]] for k in references})
    res = tokenizer.tokenize({k: [{"caption": predictions[k]}] for k in references})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"Bleu_{n}": bleu[n - 1] for n in range(1, 5)}
    scores["METEOR"] = Meteor().compute_score(gts, res)[0]
    scores["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    scores["CIDEr"] = Cider().compute_score(gts, res)[0]
    if spice:
        from pycocoevalcap.spice.spice import Spice
        scores["SPICE"] = Spice().compute_score(gts, res)[0]
    return {name: float(value) for name, value in scores.items()}


def _best_ranks(scores: np.ndarray, targets: Sequence[Sequence[int]]) -> np.ndarray:
    """ranks[r]: the position (0 = first) of the best-placed column of targets[r] in row r of
    `scores` sorted by descending score.

    Ties go to the lower column index (a stable sort of the negated scores); LAVIS reverses an
    unstable ascending argsort, which leaves their order unspecified. One row at a time, so a
    COCO-size matrix (5k x 25k) needs no second matrix-size buffer.
    """
    ranks = np.empty(len(targets), dtype=np.int64)
    for row, (row_scores, wanted) in enumerate(zip(scores, targets)):
        order = np.argsort(-row_scores.astype(np.float64), kind="stable")
        ranks[row] = np.argmax(np.isin(order, wanted))
    return ranks


def _recalls(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    recalls = {f"{prefix}_r{k}": 100.0 * float(np.mean(ranks < k)) for k in (1, 5, 10)}
    recalls[f"{prefix}_r_mean"] = sum(recalls.values()) / 3
    return recalls


def retrieval_metrics(score_i2t: np.ndarray, score_t2i: np.ndarray, img2txt: Sequence[Sequence[int]],
                      txt2img: Sequence[int]) -> dict[str, float]:
    """Recall@1/5/10 (percent) both ways, as LAVIS's retrieval `itm_eval` reports them.

    score_i2t: (images, texts); score_t2i: (texts, images); img2txt[i]: the texts of image i;
    txt2img[t]: the image of text t. An image's rank is the best rank of any of its texts; a text's
    is the rank of its image. Keys: txt_r1/5/10 and txt_r_mean (image->text), img_r1/5/10 and
    img_r_mean (text->image), r_mean (their mean), agg_metrics (= txt_r_mean, LAVIS's choice).
    Ties are broken towards the lower index (see `_best_ranks`).
    """
    score_i2t, score_t2i = np.asarray(score_i2t), np.asarray(score_t2i)
    if score_i2t.ndim != 2 or 0 in score_i2t.shape:
        raise ValueError(f"score_i2t must be a non-empty (images, texts) matrix, got shape {score_i2t.shape}")
    n_images, n_texts = score_i2t.shape
    if score_t2i.shape != (n_texts, n_images):
        raise ValueError(f"score_t2i must be (texts, images) = {(n_texts, n_images)} to match score_i2t "
                         f"{score_i2t.shape}, got shape {score_t2i.shape}")
    if len(img2txt) != n_images:
        raise ValueError(f"img2txt must have one entry per image ({n_images}), got {len(img2txt)}")
    if len(txt2img) != n_texts:
        raise ValueError(f"txt2img must have one entry per text ({n_texts}), got {len(txt2img)}")
    for name, scores in (("score_i2t", score_i2t), ("score_t2i", score_t2i)):
        if np.isnan(scores).any():
            raise ValueError(f"{name} has NaN scores, which have no rank")
    for image, texts in enumerate(img2txt):
        if len(texts) == 0 or not all(0 <= t < n_texts for t in texts):
            raise ValueError(f"img2txt[{image}] must be non-empty text indices in [0, {n_texts}), got {texts!r}")
    txt2img = np.asarray(txt2img)
    if not np.issubdtype(txt2img.dtype, np.integer) or ((txt2img < 0) | (txt2img >= n_images)).any():
        raise ValueError(f"txt2img must hold image indices in [0, {n_images}), got {txt2img.dtype} values "
                         f"{txt2img.min()}..{txt2img.max()}")

    txt_ranks = _best_ranks(score_i2t, img2txt)
    img_ranks = _best_ranks(score_t2i, txt2img[:, None])
    metrics = {**_recalls(txt_ranks, "txt"), **_recalls(img_ranks, "img")}
    metrics["r_mean"] = (metrics["txt_r_mean"] + metrics["img_r_mean"]) / 2
    metrics["agg_metrics"] = metrics["txt_r_mean"]
    return metrics
