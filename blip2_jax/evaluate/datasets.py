"""Evaluation sets: LAVIS's annotation files (COCO Karpathy, NoCaps, Flickr30K, VQAv2, OK-VQA, GQA;
VizWiz and TextVQA in the same layout, TextVQA's records with their `ocr_tokens`)
and the packaged easy-VQA test split, read into the three shapes the tasks take."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import ml_collections

from blip2_jax.data import easy_vqa
from blip2_jax.data.text import pre_caption
from blip2_jax.errors import InputNotFound, MissingKey, UserError


@dataclasses.dataclass(frozen=True)
class CaptionSet:
    """One row per image; `references` are the raw human captions (the metrics tokenise them)."""

    image_ids: list[Any]
    images: list[str]
    references: list[list[str]]


@dataclasses.dataclass(frozen=True)
class VqaSet:
    """`ocr_tokens`: each question's OCR tokens where the records have them (TextVQA), else None."""

    question_ids: list[Any]
    images: list[str]
    questions: list[str]
    answers: list[list[str]]
    ocr_tokens: list[list[str]] | None = None


@dataclasses.dataclass(frozen=True)
class ChoiceSet:
    """Multiple-choice questions (ScienceQA): each question's candidate answers, the index of the
    right one, and its context ("" where it has none)."""

    question_ids: list[Any]
    images: list[str]
    questions: list[str]
    choices: list[list[str]]
    answers: list[int]
    contexts: list[str]


@dataclasses.dataclass(frozen=True)
class RetrievalSet:
    """Every image against every text; `img2txt[i]` lists image i's captions, `txt2img[j]` is text
    j's image (None for a classification set: the texts are class names shared by many images)."""

    images: list[str]
    texts: list[str]
    img2txt: list[list[int]]
    txt2img: list[int] | None


def _read_json(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise InputNotFound(f"annotation file {path} not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from e
    if isinstance(data, dict) and "annotations" in data:  # COCO-style {"images", "annotations"}
        data = data["annotations"]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a list of records (LAVIS annotation format), got {type(data).__name__}")
    return data


def _field(record: dict, names: tuple[str, ...], path: str, row: int) -> Any:
    for name in names:
        if name in record:
            return record[name]
    raise MissingKey(f"{path} record {row} has none of {list(names)} (keys: {sorted(record)})")


def _as_list(value: Any) -> list[str]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _lavis_records(d: ml_collections.ConfigDict) -> list[tuple[dict, str]]:
    """(record, image path) for every record of `d.annotations` (comma-separated files)."""
    out = []
    for path in [p for p in d.annotations.split(",") if p]:
        for row, record in enumerate(_read_json(path)):
            out.append((record, os.path.join(d.image_root, _field(record, ("image",), path, row))))
    if not out:
        raise UserError("data.annotations names no annotation file (LAVIS eval JSON, e.g. coco_karpathy_test.json)")
    return out


def _first(data: Any, limit: int) -> Any:
    """`data` (a CaptionSet, VqaSet or ChoiceSet) cut to its first `limit` samples (0: all of them)."""
    if not limit:
        return data
    return dataclasses.replace(data, **{f.name: getattr(data, f.name)[:limit] for f in dataclasses.fields(data)
                                        if getattr(data, f.name) is not None})


def caption_set(d: ml_collections.ConfigDict) -> CaptionSet:
    return _first(_caption_set(d), d.get("limit", 0))


def vqa_set(d: ml_collections.ConfigDict) -> VqaSet:
    return _first(_vqa_set(d), d.get("limit", 0))


def choice_set(d: ml_collections.ConfigDict) -> ChoiceSet:
    """LAVIS-layout records with `choices` (a list of texts) and `answer` (the right one's index)."""
    rows = _lavis_records(d)
    choices, answers = [], []
    for i, (record, _) in enumerate(rows):
        options = _field(record, ("choices",), d.annotations, i)
        answer = _field(record, ("answer",), d.annotations, i)
        if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
            raise UserError(f"{d.annotations} record {i}: 'choices' must be a list of two or more texts, "
                             f"got {options!r}")
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(options):
            raise UserError(f"{d.annotations} record {i}: 'answer' must be the index of the right choice "
                             f"(0..{len(options) - 1}), got {answer!r}")
        choices.append(options)
        answers.append(answer)
    data = ChoiceSet([_field(r, ("question_id",), d.annotations, i) for i, (r, _) in enumerate(rows)],
                     [image for _, image in rows],
                     [_field(r, ("question",), d.annotations, i) for i, (r, _) in enumerate(rows)],
                     choices, answers, [str(r.get("context") or "") for r, _ in rows])
    return _first(data, d.get("limit", 0))


def _caption_set(d: ml_collections.ConfigDict) -> CaptionSet:
    if d.source == "easy_vqa":
        records = easy_vqa.caption_records(d.split)
        return CaptionSet([r["image_id"] for r in records], [r["image"] for r in records],
                          [[r["caption"]] for r in records])
    rows = _lavis_records(d)
    ids = [r.get("image_id", r.get("img_id", image)) for r, image in rows]
    refs = [_as_list(r.get("caption", [])) for r, _ in rows]
    return CaptionSet(ids, [image for _, image in rows], refs)


def _vqa_set(d: ml_collections.ConfigDict) -> VqaSet:
    if d.source == "easy_vqa":
        from blip2_jax.data.sources import EasyVqaSource  # pylint: disable=import-outside-toplevel

        source = EasyVqaSource(d.split)
        records = [source[i] for i in range(len(source))]
        return VqaSet([r["id"] for r in records], [r["image"] for r in records], [r["question"] for r in records],
                      [r["answer"] for r in records])
    rows = _lavis_records(d)
    ocr = None
    if any("ocr_tokens" in r for r, _ in rows):
        ocr = [_as_list(_field(r, ("ocr_tokens",), d.annotations, i)) for i, (r, _) in enumerate(rows)]
    return VqaSet([_field(r, ("question_id",), d.annotations, i) for i, (r, _) in enumerate(rows)],
                  [image for _, image in rows],
                  [_field(r, ("question",), d.annotations, i) for i, (r, _) in enumerate(rows)],
                  [_as_list(_field(r, ("answer", "answers"), d.annotations, i)) for i, (r, _) in enumerate(rows)],
                  ocr)


def retrieval_set(d: ml_collections.ConfigDict) -> RetrievalSet:
    """LAVIS's retrieval test sets: each image's captions, pre-processed (`pre_caption`, 30 words as
    LAVIS's eval text processor keeps at most). easy-VQA: the 24 distinct captions, each image's own
    one the single match (zero-shot classification)."""
    if d.source == "easy_vqa":
        classes = easy_vqa.all_captions()
        records = easy_vqa.caption_records(d.split)
        return RetrievalSet([r["image"] for r in records], classes, [[classes.index(r["caption"])] for r in records],
                            None)
    images, texts, img2txt, txt2img = [], [], [], []
    for i, (record, image) in enumerate(_lavis_records(d)):
        images.append(image)
        captions = _as_list(_field(record, ("caption",), d.annotations, i))
        img2txt.append(list(range(len(texts), len(texts) + len(captions))))
        texts += [pre_caption(c, 30) for c in captions]
        txt2img += [i] * len(captions)
    return RetrievalSet(images, texts, img2txt, txt2img)
