"""What `blip2-jax infer` reads: a directory of images, or LAVIS-style annotation files (an `image`
path under an image root, and a `question` for answers), as records with a stable `id` and the
image's path as given (`file`, relative to the root); or, read record by record as the job reaches
them, an ArrayRecord set (`blip2-jax data build`) or a TFDS data set, whose images are bytes or
arrays inside the records.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from blip2_jax.errors import InputNotFound, UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def image_folder(directory: str | os.PathLike) -> list[dict[str, Any]]:
    """Every image file under `directory` (recursively), sorted by its path; the id is that path
    relative to `directory`."""
    root = Path(directory)
    if not root.is_dir():
        raise InputNotFound(f"--images {root}: not a directory")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"--images {root}: no image files ({', '.join(IMAGE_SUFFIXES)}) under it")
    return [{"id": str(p.relative_to(root)), "file": str(p.relative_to(root)), "image": str(p)} for p in files]


def annotation_records(files: list[str], image_root: str, *, need_question: bool = False,
                       per_image: bool = False) -> list[dict[str, Any]]:
    """The records of LAVIS-style JSON files, in order; the id is `question_id`, else `image_id`,
    else the image path. Every record is checked before anything runs. `per_image`: one record per
    image (the first one's fields), its `caption` every caption the image's records hold, as a
    caption set lists each of an image's captions as a record of its own."""
    records = []
    for path in files:
        if not Path(path).is_file():
            raise InputNotFound(f"--annotations {path}: not found")
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"--annotations {path}: not valid JSON ({e})") from e
        if not isinstance(data, list):
            raise UserError(f"--annotations {path}: expected a list of records, got {type(data).__name__}")
        for row, record in enumerate(data):
            missing = [k for k in ("image", *(("question",) if need_question else ())) if k not in record]
            if not isinstance(record, dict) or missing:
                raise UserError(f"--annotations {path}: record {row} has no {' or '.join(missing or ['fields'])}")
            key = record.get("question_id", record.get("image_id", record["image"]))
            records.append({**record, "id": str(key), "file": record["image"],
                            "image": os.path.join(image_root, record["image"])})
    if per_image:
        records = _per_image(records)
    ids = [r["id"] for r in records]
    if len(set(ids)) != len(ids):
        raise UserError("--annotations: record ids (question_id, image_id or image) repeat; each row needs its own")
    return records


def captions_of(record: dict[str, Any]) -> list[str]:
    """A record's captions: none, one (a string) or a list of them."""
    caption = record.get("caption", [])
    return [caption] if isinstance(caption, str) else [str(c) for c in caption]


def _per_image(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {}
    for record in records:
        first = merged.setdefault(record["image"], {**record, "id": str(record.get("image_id", record["file"])),
                                                    "caption": []})
        first["caption"] += captions_of(record)
    return list(merged.values())


class SourceRecords:
    """A data source's records as infer reads them, fetched when asked for: the id is `question_id`,
    else `image_id`, else the source's `id`. `identity` names the set for `run.json` (a resumed run
    must read the same one) without reading every record."""

    def __init__(self, source: Any, identity: str, *, need_question: bool):
        self.source, self.identity = source, identity
        if not len(source):
            raise UserError(f"{identity}: no records")
        first = source[0]
        missing = [k for k in ("image", *(("question",) if need_question else ())) if k not in first]
        if missing:
            raise UserError(f"{identity}: record 0 has no {' or '.join(missing)} (fields: {', '.join(sorted(first))})")

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.source[index]
        key = record.get("question_id", record.get("image_id", record.get("id", index)))
        return {**record, "id": str(key), "file": None}


def arrayrecord_records(prefix: str, *, need_question: bool) -> SourceRecords:
    """An ArrayRecord set written by `blip2-jax data build` (its manifest checked first)."""
    from blip2_jax.data.sources import ArrayRecordSource, manifest_path  # pylint: disable=import-outside-toplevel

    source = ArrayRecordSource(prefix)
    build = json.loads(manifest_path(prefix).read_text()).get("build_id", "")
    return SourceRecords(source, f"--arrayrecord {prefix} (build {build})", need_question=need_question)


def tfds_records(name_split: str, data_dir: str, fields: Sequence[str], *, need_question: bool) -> SourceRecords:
    """`NAME:SPLIT` of a TFDS data set prepared in the array_record format; `fields` maps record keys
    to feature names, e.g. ("image=image", "question=question/text")."""
    from blip2_jax.data.sources import TfdsSource  # pylint: disable=import-outside-toplevel

    name, _, split = name_split.partition(":")
    if not name or not split:
        raise UserError(f"--tfds {name_split!r}: expected NAME:SPLIT, e.g. coco_captions:val")
    mapping = dict(f.split("=", 1) for f in fields if "=" in f)
    if len(mapping) != len(fields):
        raise UserError(f"--tfds_fields {list(fields)}: each is KEY=FEATURE, e.g. image=image")
    source = TfdsSource(name, split, data_dir or None, {"image": "image", **mapping})
    return SourceRecords(source, f"--tfds {name_split} ({len(source)} records)", need_question=need_question)
