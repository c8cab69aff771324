"""`blip2-jax eval`: one task (captioning, VQA, retrieval) of a checkpoint over a whole set.

Writes `results.json` (one entry per sample, in the set's order) and `metrics.json` to the
output directory (process 0 only); every host computes the same results from replicated outputs.
"""
from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from blip2_jax.data.text import pre_question
from blip2_jax.data.tokenizers import qformer_tokenizer
from blip2_jax.errors import UserError
from blip2_jax.evaluate import datasets, metrics
from blip2_jax.evaluate.choice import candidate_nll
from blip2_jax.evaluate.generation import generate_texts
from blip2_jax.evaluate.model import generation_tokenizers, load_model, tokenizer_path
from blip2_jax.evaluate.retrieval import retrieval_scores
from blip2_jax.generation.config import GenerationConfig
from blip2_jax.models import quantization
from blip2_jax.parallel import mesh as mesh_lib
from blip2_jax.train.validate import check_eval_config

RANKS_KEPT = 10  # results.json keeps each query's top 10 (all R@k need)
OCR_TOKENS = 30  # LAVIS's InstructBLIP predict_answers keeps a question's first 30 OCR tokens


def _progress(total: int, what: str):
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel

    return tqdm(total=total, desc=what, disable=jax.process_index() != 0, leave=False)


def _generation(config: ml_collections.ConfigDict) -> GenerationConfig:
    return GenerationConfig(**config.generation.to_dict())


def _caption(config, model, mesh, data) -> tuple[list[dict], dict[str, float]]:
    with _progress(len(data.images), "caption") as bar:
        texts = generate_texts(model, mesh, data.images, [config.prompt] * len(data.images),
                               config=_generation(config), batch_size=config.batch_size, progress=bar.update,
                               **generation_tokenizers(model, config.tokenizer))
    results = [{"image_id": i, "caption": t} for i, t in zip(data.image_ids, texts)]
    refs = dict(enumerate(data.references))
    return results, metrics.caption_metrics(dict(enumerate(texts)), refs, spice=config.spice)


def _vqa(config, model, mesh, data) -> tuple[list[dict], dict[str, float]]:
    if config.prompt.count("{}") == 2:  # LAVIS's InstructBLIP TextVQA: a question's first 30 OCR tokens, then it
        prompts = [config.prompt.format(", ".join(ocr[:OCR_TOKENS]), pre_question(q))
                   for ocr, q in zip(data.ocr_tokens, data.questions)]
    else:
        prompts = [config.prompt.format(pre_question(q)) for q in data.questions]
    with _progress(len(prompts), "vqa") as bar:
        answers = generate_texts(model, mesh, data.images, prompts, config=_generation(config),
                                 batch_size=config.batch_size, progress=bar.update,
                                 **generation_tokenizers(model, config.tokenizer))
    results = [{"question_id": q, "answer": a} for q, a in zip(data.question_ids, answers)]
    score = metrics.vqa_score(dict(enumerate(answers)), dict(enumerate(data.answers)), metric=config.metric)
    return results, score


def choice_prompt(template: str, question: str, choices: Sequence[str], context: str) -> str:
    """A multiple-choice question's prompt as LAVIS's InstructBLIP composes it: a two-slot template
    takes the question and the choices as "(a) ... (b) ..." (`predict_answers`), a one-slot one the
    question; a context goes first as "context: ... ." (`predict_class`)."""
    options = " ".join(f"({string.ascii_lowercase[j]}) {c}" for j, c in enumerate(choices))
    text = template.format(question, options) if template.count("{}") == 2 else template.format(question)
    return f"context: {context}. {text}" if context else text


def _choice(config, model, mesh, data) -> tuple[list[dict], dict[str, float]]:
    prompts = [choice_prompt(config.prompt, q, c, x) for q, c, x in zip(data.questions, data.choices, data.contexts)]
    with _progress(sum(map(len, data.choices)), "choice") as bar:
        nll = candidate_nll(model, mesh, data.images, prompts, data.choices, batch_size=config.batch_size,
                            progress=bar.update, **generation_tokenizers(model, config.tokenizer))
    picked = [int(np.argmin(s)) for s in nll]  # ties: the first, as torch.argsort's first rank
    results = [{"question_id": q, "answer": p, "scores": s.tolist()} for q, p, s in zip(data.question_ids, picked, nll)]
    correct = [p == a for p, a in zip(picked, data.answers)]
    return results, {"accuracy": float(np.mean(correct)) if correct else 0.0, "count": len(correct)}


def _retrieval(config, model, mesh, data) -> tuple[dict, dict[str, float]]:
    n = len(data.texts) + len(data.images)
    tokenizer = qformer_tokenizer(tokenizer_path(model, config.tokenizer))
    with _progress(n, "retrieval") as bar:
        scores = retrieval_scores(model, mesh, data.images, data.texts, tokenizer, k_test=config.k_test,
                                  batch_size=config.batch_size, text_length=config.text_length,
                                  progress=bar.update)
    top_i2t = np.argsort(-scores.i2t, axis=1, kind="stable")[:, :RANKS_KEPT]
    results = {"i2t": [{"image": i, "texts": t.tolist(), "scores": scores.i2t[i, t].tolist()}
                       for i, t in enumerate(top_i2t)]}
    if data.txt2img is None:  # classification: each image's own caption among the classes
        correct = [int(top_i2t[i, 0]) in data.img2txt[i] for i in range(len(data.images))]
        return results, {"accuracy": float(np.mean(correct)), "count": len(correct)}
    top_t2i = np.argsort(-scores.t2i, axis=1, kind="stable")[:, :RANKS_KEPT]
    results["t2i"] = [{"text": j, "images": t.tolist(), "scores": scores.t2i[j, t].tolist()}
                      for j, t in enumerate(top_t2i)]
    return results, metrics.retrieval_metrics(scores.i2t, scores.t2i, data.img2txt, data.txt2img)


def _read_set(config: ml_collections.ConfigDict) -> Any:
    """The task's set, and what the prompt needs from its records."""
    read = {"caption": datasets.caption_set, "vqa": datasets.vqa_set, "choice": datasets.choice_set,
            "retrieval": datasets.retrieval_set}[config.task]
    data = read(config.data)
    if config.task == "vqa" and config.prompt.count("{}") == 2 and data.ocr_tokens is None:
        raise UserError(f"the prompt {config.prompt!r} takes each question's OCR tokens, but the records of "
                        f"{config.data.annotations} have no 'ocr_tokens'")
    return data


def evaluate(config: ml_collections.ConfigDict, output: str | Path | None = None) -> dict[str, float]:
    """Run `config.task` on `config.checkpoint`; write results.json and metrics.json to `output`."""
    check_eval_config(config, devices=jax.device_count())
    data = _read_set(config)  # every record checked before the model loads
    devices = jax.devices() if config.num_devices == -1 else jax.devices()[:config.num_devices]
    mesh = mesh_lib.make_mesh(-1, config.fsdp, 1, devices)
    model = load_model(config.checkpoint, mesh, step=config.step if config.step >= 0 else None,
                       dtype=config.dtype or None, int8=quantization.TOWERS if config.int8 else ())
    if config.task == "retrieval" and not hasattr(model.module, "itm"):
        raise ValueError(f"retrieval needs a model with the ITC/ITM heads (Blip2ForImageTextRetrieval or a stage-1 "
                         f"checkpoint); {config.checkpoint} is a {type(model.module).__name__}")
    if config.task != "retrieval" and model.config.text is None:
        raise ValueError(f"{config.task} needs a BLIP-2 model with a language model; {config.checkpoint} is a "
                         "retrieval model")
    run = {"caption": _caption, "vqa": _vqa, "choice": _choice, "retrieval": _retrieval}[config.task]
    results, scores = run(config, model, mesh, data)
    if output is not None and jax.process_index() == 0:
        output = Path(output)
        output.mkdir(parents=True, exist_ok=True)
        (output / "results.json").write_text(json.dumps(results, indent=1))
        (output / "metrics.json").write_text(json.dumps({"task": config.task, "checkpoint": str(config.checkpoint),
                                                         **scores}, indent=2))
    return scores
