"""Captions and language-model text for the `easy-vqa` set (one coloured shape per image).

The package gives questions and answers, not captions. An image's colour and shape follow from its
answers: "what color is the shape?" -> blue, "is there not a red shape?" -> no (so red), "does the
image contain a circle?" -> yes. 3,542 of the 4,000 training images and 880 of the 1,000 test images
have both determined; `caption` is then "a blue circle", the text `blip2-jax demo` trains stage 1 on.
"""
from __future__ import annotations

import functools
import re

from blip2_jax.data.text import pre_question

COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
_NEGATED = re.compile(r"\b(not|no)\b")


def _questions(split: str) -> tuple[list[str], list[str], list[int]]:
    import easy_vqa  # pylint: disable=import-outside-toplevel

    if split not in ("train", "test"):
        raise ValueError(f"easy-vqa has splits 'train' and 'test', got {split!r}")
    return (easy_vqa.get_train_questions if split == "train" else easy_vqa.get_test_questions)()


def _image_paths(split: str) -> dict[int, str]:
    import easy_vqa  # pylint: disable=import-outside-toplevel

    return (easy_vqa.get_train_image_paths if split == "train" else easy_vqa.get_test_image_paths)()


@functools.lru_cache(maxsize=2)
def attributes(split: str) -> dict[int, tuple[str, str]]:
    """image id -> (colour, shape) for the images whose answers determine both."""
    found: dict[int, dict[str, str]] = {}
    for question, answer, image in zip(*_questions(split)):
        words = question.replace("?", "").split()
        named = {"color": [w for w in words if w in COLORS], "shape": [w for w in words if w in SHAPES]}
        facts = found.setdefault(image, {})
        for kind, values in (("color", COLORS), ("shape", SHAPES)):
            if answer in values:  # "what color is ...?" -> the colour itself
                facts[kind] = answer
            elif named[kind] and (question.startswith("what") or (answer == "yes") != bool(_NEGATED.search(question))):
                facts[kind] = named[kind][0]  # "what is the blue shape?", or a true "is there a blue shape?"
    return {i: (f["color"], f["shape"]) for i, f in sorted(found.items()) if len(f) == 2}


def caption(color: str, shape: str) -> str:
    return f"a {color} {shape}"


def all_captions() -> list[str]:
    """The 24 distinct captions, the classes of zero-shot classification by ITC."""
    return [caption(c, s) for c in COLORS for s in SHAPES]


def caption_records(split: str) -> list[dict]:
    """One caption record per image whose caption is determined (the stage-1 data of the demo);
    `class_id` numbers the 24 captions: images with the same one are positives of each other."""
    paths = _image_paths(split)
    classes = all_captions()
    return [{"id": f"easy_vqa_captions/{split}:{i}", "image": paths[i], "image_id": i, "caption": caption(*cs),
             "class_id": classes.index(caption(*cs))} for i, cs in attributes(split).items()]


def lm_records(split: str) -> list[dict]:
    """{"context": "a red circle.", "text": "question: is there a red shape answer: yes", "prompt":
    the text up to "answer:"} for every question of an image with a caption: the caption precedes
    what can be asked of it (the demo's LM corpus; the answer is the LM's target). The caption is a
    context before BOS (`tokenizers.opt_context`), where BLIP-2 puts the image's queries: with it
    after BOS instead, the LM answered 0.93 of the test questions from the caption but only 0.75 with
    the same caption embeddings moved before BOS, which is where stage 2's visual prompt sits."""
    known = attributes(split)
    out = []
    for n, (q, a, i) in enumerate(zip(*_questions(split))):
        if i in known:
            prompt = f"question: {pre_question(q)} answer:"  # as stage 2 formats it
            out.append({"id": f"easy_vqa_text/{split}:{n}", "context": f"{caption(*known[i])}.",
                        "text": f"{prompt} {a}", "prompt": prompt})
    return out


class ListSource:
    """Records held in memory (a `data.sources.Source`)."""

    def __init__(self, records: list[dict]):
        self._records = records

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        return self._records[index]
