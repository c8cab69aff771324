"""InstructBLIP's instruction templates (Dai et al. 2023, appendix: "instruction templates used for
transforming held-in datasets"), one drawn per record so that the model learns a task from many
phrasings rather than one prompt.

The paper writes each template with an `<Image>` slot first; here the image is always first (the
query outputs come before any text), so the slot is left out. A VQA template takes the question, a
question-generation (VQG) template the answer; a caption template takes nothing. The templates'
wording was checked against several independent public copies of the paper's table (its own text
and code that ships it); the paper does not release them as code.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from blip2_jax.data.text import pre_caption, pre_question

CAPTION = (
    "A short image caption:",
    "A short image description:",
    "A photo of",
    "An image that shows",
    "Write a short description for the image.",
    "Write a description for the photo.",
    "Provide a description of what is presented in the photo.",
    "Briefly describe the content of the image.",
    "Can you briefly explain what you see in the image?",
    "Could you use a few words to describe what you perceive in the photo?",
    "Please provide a short depiction of the picture.",
    "Using language, provide a short account of the image.",
    "Use a few words to illustrate what is happening in the picture.",
)
VQA = (  # {} is the question
    "{}",
    "Question: {}",
    "{} A short answer to the question is",
    "Q: {} A:",
    "Question: {} Short answer:",
    "Given the image, answer the following question with no more than three words. {}",
    "Based on the image, respond to this question with a short answer: {}. Answer:",
    "Use the provided image to answer the question: {} Provide your answer as short as possible:",
    'What is the answer to the following question? "{}"',
    'The question "{}" can be answered using the image. A short answer is',
)
VQG = (  # {} is the answer; the target is the question
    "Given the image, generate a question whose answer is: {}. Question:",
    "Based on the image, provide a question with the answer: {}. Question:",
    'Given the visual representation, create a question for which the answer is "{}".',
    "From the image provided, craft a question that leads to the reply: {}. Question:",
    "Considering the picture, come up with a question where the answer is: {}.",
    "Taking the image into account, generate an question that has the answer: {}. Question:",
)
TEMPLATES = {"caption": CAPTION, "vqa": VQA, "vqg": VQG}
# data.templates: "" (data.prompt for every record, BLIP-2's way) or the paper's pools.
TEMPLATE_SETS = ("", "instructblip")


def record_task(record: dict[str, Any]) -> str:
    """A record's task: its `task` field (a mixture entry's `task`, e.g. 'vqg' to turn a VQA set
    into question generation), else 'caption' or 'vqa' by its fields."""
    task = record.get("task") or ("caption" if "caption" in record else "vqa" if "question" in record else "")
    if task not in TEMPLATES:
        raise KeyError(f"record {record.get('id')!r}: task {task!r} is not one of {sorted(TEMPLATES)} (a record "
                       f"needs 'caption' or 'question'; keys: {sorted(record)})")
    return task


def first_answer(record: dict[str, Any]) -> Any:
    answers = record.get("answer")
    return answers[0] if isinstance(answers, (list, tuple)) and answers else answers


def instruction_texts(record: dict[str, Any], rng: np.random.Generator,
                      vqa_templates: tuple[str, ...] = ()) -> tuple[str, str]:
    """(instruction, target) of a caption, VQA or VQG record through a template drawn with `rng`
    (the pipeline's per-record generator, so a resumed run draws the same ones); `vqa_templates`,
    if given, replace the paper's VQA ones (a run's own phrasings)."""
    task = record_task(record)
    pool = vqa_templates if task == "vqa" and vqa_templates else TEMPLATES[task]
    template = pool[int(rng.integers(len(pool)))]
    if task == "caption":
        return template, pre_caption(record["caption"])
    if task == "vqa":
        return template.format(pre_question(record["question"])), pre_caption(first_answer(record))
    return template.format(pre_caption(first_answer(record))), pre_question(record["question"])
