"""Random-access data sources: `len(source)` and `source[i]` -> a record dict with a unique `id`.

Every source yields the same record layout, so one processing function serves them all:
`image` (a file path, encoded image bytes or a uint8 array), and the text fields of the annotation
as LAVIS writes them: `caption` for captioning files, `question` + `answer` (a list) for VQA files.
Reading a record never opens its image: a bad image fails later, inside processing, where the
pipeline can skip and count it (`pipeline.py`).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import uuid
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import msgpack
import numpy as np
from absl import logging
from PIL import Image

from blip2_jax.data.images import load_image
from blip2_jax.errors import InputNotFound, UserError

Record = dict[str, Any]


# Every data.source the loader reads ("synthetic" needs no files). Here, not in loader.py, so that
# config validation (and with it `plan`) does not import the Grain pipeline.
SOURCES = ("synthetic", "json", "arrayrecord", "tfds", "webdataset", "parquet", "easy_vqa", "easy_vqa_captions",
           "easy_vqa_text")
# The batch kinds (`train/layout.py::data_kind`) whose records `loader.RecordProcessor` tokenises.
RECORD_KINDS = ("stage1", "stage2_opt", "stage2_llama", "stage2_t5", "lm_opt")
# How a mixture without weights draws its sources: by size (LAVIS) or its square root (InstructBLIP).
BALANCES = ("size", "sqrt")

class Source(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Record: ...


class Tagged:
    """A source whose every record also holds `fields` (e.g. a mixture entry's `task`)."""

    def __init__(self, source: Source, fields: dict[str, Any]):
        self.source, self.fields = source, dict(fields)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Record:
        return {**self.source[index], **self.fields}


class CachedImages:
    """A source whose images are decoded once and then kept in memory, as uint8 RGB arrays
    (`data.cache_images`, like big_vision's `cache_raw`): for a set small enough to hold decoded
    (easy-VQA's 4,000 training images are 49 MB), read again every epoch, or many times an epoch by
    its questions. The pixels are the ones a path or bytes give (`read_image` of the array is the
    same RGB image). Keyed by path, or by record id for encoded bytes. A record whose image cannot be
    read keeps its path or bytes, so that it fails in processing as without the cache (the pipeline
    skips and counts it under its record id)."""

    def __init__(self, source: Source):
        self.source = source
        self._pixels: dict[str, np.ndarray] = {}  # filled from any reading thread: one entry per image
        if hasattr(source, "record_id"):  # a source that names a record it cannot read keeps doing so
            self.record_id = source.record_id

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Record:
        record = self.source[index]
        image = record.get("image")
        if image is None or isinstance(image, np.ndarray):
            return record
        key = os.fspath(image) if isinstance(image, (str, os.PathLike)) else str(record.get("id", index))
        pixels = self._pixels.get(key)
        if pixels is None:
            try:
                pixels = self._pixels[key] = np.asarray(read_image(image))
            except Exception:  # pylint: disable=broad-except  # left to processing: skipped, counted, named
                return record
        return {**record, "image": pixels}


def read_image(image: str | os.PathLike | bytes | np.ndarray) -> Image.Image:
    """An RGB PIL image from any record's `image` field (a path, encoded bytes or a uint8 array)."""
    if isinstance(image, bytes):
        if not image:
            raise ValueError("the image bytes are empty")
        try:
            with Image.open(io.BytesIO(image)) as opened:
                return load_image(opened)  # converts, which decodes fully: truncation raises here
        except OSError as e:
            raise ValueError(f"the image bytes are not a readable image: {e}") from e
    return load_image(image)


class JsonSource:
    """LAVIS-style annotation files (a JSON list of dicts with an `image` path relative to
    `image_root`). A `caption` given as a list becomes one record per caption, as every caption is a
    training pair. Record ids are `<file name>:<index>` (`:<caption number>` for expanded lists),
    unique even where a file repeats an `image_id`."""

    def __init__(self, annotations: str | os.PathLike | Sequence[str | os.PathLike], image_root: str | os.PathLike):
        files = [annotations] if isinstance(annotations, (str, os.PathLike)) else list(annotations)
        self.image_root = Path(image_root)
        self._records: list[Record] = []
        for file in files:
            self._records.extend(self._read(Path(file)))

    def _read(self, file: Path) -> Iterable[Record]:
        try:
            annotations = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read annotation file {file}: {e}") from e
        if not isinstance(annotations, list):
            raise UserError(f"annotation file {file} must hold a JSON list, got {type(annotations).__name__}")
        for i, ann in enumerate(annotations):
            if not isinstance(ann, dict) or not isinstance(ann.get("image"), str):
                raise UserError(f"{file} entry {i} needs an 'image' path: {str(ann)[:200]}")
            record = {**ann, "image": str(self.image_root / ann["image"])}
            if isinstance(ann.get("caption"), list):
                for k, caption in enumerate(ann["caption"]):
                    yield {**record, "id": f"{file.name}:{i}:{k}", "caption": caption}
            else:
                yield {**record, "id": f"{file.name}:{i}"}

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> Record:
        return dict(self._records[index])


MANIFEST_SUFFIX = ".manifest.json"


def manifest_path(prefix: str | os.PathLike) -> Path:
    """Where `write_array_records` lists the shards of `prefix`: `<prefix>.manifest.json`."""
    return Path(f"{prefix}{MANIFEST_SUFFIX}")


def _shard_pattern(name: str) -> re.Pattern:
    """Shard file names of prefix `name`: this writer's `<name>-<build>-00000-of-00004.array_record` and
    the unversioned `<name>-00000-of-00004.array_record` of earlier builds, nothing else (so that
    prefixes like `coco` and `coco-val` in one directory never touch each other's files)."""
    return re.compile(rf"{re.escape(name)}-(?:[0-9a-f]{{12}}-)?\d{{5}}-of-\d{{5}}\.array_record")


def write_array_records(source: Source, prefix: str | os.PathLike, num_shards: int) -> tuple[list[str], list[str]]:
    """Write `source` as `num_shards` ArrayRecord files, each record a msgpack map with the image
    file's bytes as they are on disk (no re-encoding: the pixels the JSON source gives are kept).
    Records whose image file is missing, or that the source cannot read (a tar member without an
    image), cannot be stored and are left out (logged); unreadable image bytes are stored, and skipped
    when read like any other bad record. If no record can be
    stored, nothing is written and a ValueError names the first missing images.

    The set is committed by `<prefix>.manifest.json` (shard names, record counts, a build id),
    replaced atomically after every shard is complete; the shard names carry the build id, so an
    interrupted build leaves the previous set readable, and a rebuild (any `num_shards`) replaces it:
    the previous shards are deleted once the new manifest is in place. Returns (shard paths, ids
    left out)."""
    from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=import-outside-toplevel

    if num_shards < 1:
        raise UserError(f"num_shards must be >= 1, got {num_shards}")
    prefix = Path(prefix)
    new_dirs = [d for d in (prefix.parent, *prefix.parent.parents) if not d.exists()]  # removed on failure
    prefix.parent.mkdir(parents=True, exist_ok=True)
    build_id = uuid.uuid4().hex[:12]
    paths = [f"{prefix}-{build_id}-{i:05d}-of-{num_shards:05d}.array_record" for i in range(num_shards)]
    missing: list[tuple[str, str]] = []  # (record id, why)
    shards: list[dict[str, Any]] = []
    staged = manifest_path(prefix).with_name(f".{prefix.name}.{build_id}{MANIFEST_SUFFIX}")
    committed = False
    n = len(source)
    try:
        for shard, path in enumerate(paths):
            # group_size:1 keeps every record separately addressable, which random access needs.
            writer = ArrayRecordWriter(path, "group_size:1")
            count = 0
            for index in range(shard * n // num_shards, (shard + 1) * n // num_shards):
                try:
                    record = source[index]
                except (OSError, ValueError) as e:  # e.g. a tar member without an image, or cut off
                    name = source.record_id(index) if hasattr(source, "record_id") else f"record {index}"
                    logging.warning("%s left out: %s", name, e)
                    missing.append((name, str(e)))
                    continue
                if isinstance(record["image"], str):
                    try:
                        record["image"] = Path(record["image"]).read_bytes()
                    except OSError as e:
                        logging.warning("record %s: image %s left out: %s", record["id"], record["image"], e)
                        missing.append((record["id"], str(e)))
                        continue
                writer.write(msgpack.packb(record, use_bin_type=True))
                count += 1
            writer.close()
            shards.append({"file": Path(path).name, "records": count})
        if n and len(missing) == n:
            raise UserError(f"none of the {n} records has a readable image file, nothing written; the first: "
                             f"{'; '.join(f'{i}: {e}' for i, e in missing[:3])}")
        manifest = {"build_id": build_id, "num_records": n - len(missing), "shards": shards}
        staged.write_text(json.dumps(manifest, indent=1))
        os.replace(staged, manifest_path(prefix))
        committed = True
    finally:
        # Not committed: this build's files go. Committed: every other build's shards of this prefix go.
        staged.unlink(missing_ok=True)
        keep = {Path(p).name for p in paths} if committed else set()
        pattern = _shard_pattern(prefix.name)
        for old in prefix.parent.iterdir():
            if pattern.fullmatch(old.name) and old.name not in keep and (committed or build_id in old.name):
                old.unlink(missing_ok=True)
        for directory in [] if committed else new_dirs:
            with contextlib.suppress(OSError):  # not empty: someone else wrote there meanwhile
                directory.rmdir()
    return paths, [record_id for record_id, _ in missing]


class ArrayRecordSource:
    """ArrayRecord shards written by `write_array_records` (or any msgpack-map records with an `id`).
    `paths` is the prefix given to the writer, whose manifest says which shards make the set and how
    many records each holds (a missing, truncated or foreign shard is an error, not a smaller data
    set), or an explicit list of files."""

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike]):
        if isinstance(paths, (str, os.PathLike)):
            paths = self._from_manifest(Path(paths))
        import grain  # pylint: disable=import-outside-toplevel  # grain pulls in its own deps

        self.paths = [str(p) for p in paths]
        self._source = grain.sources.ArrayRecordDataSource(self.paths)

    @staticmethod
    def _from_manifest(prefix: Path) -> list[Path]:
        from array_record.python.array_record_module import ArrayRecordReader  # pylint: disable=import-outside-toplevel

        manifest = manifest_path(prefix)
        if not manifest.is_file():
            raise InputNotFound(f"no ArrayRecord set at {prefix}: {manifest} not found (write the shards with "
                                    "`blip2-jax data build`)")
        try:
            shards = [(str(s["file"]), int(s["records"])) for s in json.loads(manifest.read_text())["shards"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{manifest} is not a shard manifest: {e}") from e
        paths, problems = [prefix.parent / file for file, _ in shards], []
        for path, (_, records) in zip(paths, shards):
            if not path.is_file():
                problems.append(f"{path.name} missing")
                continue
            try:  # a cut-off or foreign file raises, or reads as 0 records
                reader = ArrayRecordReader(str(path))
                found = reader.num_records()
                reader.close()
            except RuntimeError as e:
                problems.append(f"{path.name} unreadable ({e})")
                continue
            if found != records:
                problems.append(f"{path.name} holds {found} records, the manifest says {records}")
        if problems:
            raise UserError(f"ArrayRecord set {prefix} does not match {manifest.name}: {'; '.join(problems[:3])}"
                             + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""))
        return paths

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Record:
        data = self._source[index]
        try:
            return msgpack.unpackb(data, raw=False)
        except (ValueError, msgpack.UnpackException) as e:
            raise ValueError(f"record {index} of {self.paths} is not a msgpack record: {e}") from e


class TfdsSource:
    """A TFDS data set read with `tfds.data_source(name, split=..., data_dir=...)`: random access to
    a set prepared in the array_record file format, decoded with numpy and PIL (no TensorFlow).
    `fields` maps our record keys to feature names, e.g. {"image": "image", "caption": "captions/text"}
    (a '/' walks nested features)."""

    def __init__(self, name: str, split: str, data_dir: str | None = None, fields: dict[str, str] | None = None):
        try:
            import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
        except ImportError as e:
            raise ImportError(f"TfdsSource({name!r}) needs tensorflow_datasets: pip install tensorflow-datasets") from e
        self.name, self.split = name, split
        self.fields = fields or {"image": "image", "caption": "caption"}
        self._source = tfds.data_source(name, split=split, data_dir=data_dir)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Record:
        example = self._source[index]
        record: Record = {"id": f"{self.name}/{self.split}:{index}"}
        for key, feature in self.fields.items():
            value = example
            for part in feature.split("/"):
                value = value[part]
            record[key] = value.decode() if isinstance(value, bytes) and key != "image" else value
        return record


class EasyVqaSource:
    """The `easy-vqa` package's synthetic VQA set (shapes and colours; train 38,575 questions on
    4,000 images, test 9,673 on 1,000): the offline data set of `blip2-jax demo` and the tests."""

    def __init__(self, split: str = "train"):
        import easy_vqa  # pylint: disable=import-outside-toplevel

        if split not in ("train", "test"):
            raise UserError(f"easy-vqa has splits 'train' and 'test', got {split!r}")
        self.split = split
        get_questions = easy_vqa.get_train_questions if split == "train" else easy_vqa.get_test_questions
        get_paths = easy_vqa.get_train_image_paths if split == "train" else easy_vqa.get_test_image_paths
        self._questions, self._answers, self._image_ids = get_questions()
        self._paths = get_paths()

    def __len__(self) -> int:
        return len(self._questions)

    def __getitem__(self, index: int) -> Record:
        image_id = self._image_ids[index]
        return {"id": f"easy_vqa/{self.split}:{index}", "image": self._paths[image_id], "image_id": image_id,
                "question": self._questions[index], "answer": [self._answers[index]]}
