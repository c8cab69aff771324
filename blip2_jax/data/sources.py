"""Random-access data sources: `len(source)` and `source[i]` -> a record dict with a unique `id`.

Every source yields the same record layout, so one processing function serves them all:
`image` (a file path, encoded image bytes or a uint8 array), and the text fields of the annotation
as LAVIS writes them: `caption` for captioning files, `question` + `answer` (a list) for VQA files.
Reading a record never opens its image: a bad image fails later, inside processing, where the
pipeline can skip and count it (`pipeline.py`).
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import msgpack
import numpy as np
from absl import logging
from PIL import Image

from blip2_jax.data.images import load_image

Record = dict[str, Any]


class Source(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Record: ...


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
            raise ValueError(f"cannot read annotation file {file}: {e}") from e
        if not isinstance(annotations, list):
            raise ValueError(f"annotation file {file} must hold a JSON list, got {type(annotations).__name__}")
        for i, ann in enumerate(annotations):
            if not isinstance(ann, dict) or not isinstance(ann.get("image"), str):
                raise ValueError(f"{file} entry {i} needs an 'image' path: {str(ann)[:200]}")
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


def shard_paths(prefix: str | os.PathLike, num_shards: int) -> list[str]:
    """The file names of an ArrayRecord data set: `<prefix>-00000-of-00004.array_record`, ..."""
    return [f"{prefix}-{i:05d}-of-{num_shards:05d}.array_record" for i in range(num_shards)]


def write_array_records(source: Source, prefix: str | os.PathLike, num_shards: int) -> tuple[list[str], list[str]]:
    """Write `source` as `num_shards` ArrayRecord files, each record a msgpack map with the image
    file's bytes as they are on disk (no re-encoding: the pixels the JSON source gives are kept).
    Records whose image file is missing cannot be stored and are left out (logged); unreadable
    image bytes are stored, and skipped when read like any other bad record.
    Returns (shard paths, ids left out)."""
    from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=import-outside-toplevel

    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    paths = shard_paths(prefix, num_shards)
    Path(paths[0]).parent.mkdir(parents=True, exist_ok=True)
    missing = []
    n = len(source)
    for shard, path in enumerate(paths):
        # group_size:1 keeps every record separately addressable, which random access needs.
        writer = ArrayRecordWriter(path, "group_size:1")
        for index in range(shard * n // num_shards, (shard + 1) * n // num_shards):
            record = source[index]
            if isinstance(record["image"], str):
                try:
                    record["image"] = Path(record["image"]).read_bytes()
                except OSError as e:
                    logging.warning("record %s: image %s left out: %s", record["id"], record["image"], e)
                    missing.append(record["id"])
                    continue
            writer.write(msgpack.packb(record, use_bin_type=True))
        writer.close()
    return paths, missing


class ArrayRecordSource:
    """ArrayRecord shards written by `write_array_records` (or any msgpack-map records with an `id`).
    `paths` is a list of files or a prefix as given to the writer."""

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike]):
        if isinstance(paths, (str, os.PathLike)):
            prefix = Path(paths)
            paths = sorted(prefix.parent.glob(f"{prefix.name}-*-of-*.array_record"))
            if not paths:
                raise FileNotFoundError(f"no ArrayRecord shards {prefix}-*-of-*.array_record")
        import grain  # pylint: disable=import-outside-toplevel  # grain pulls in its own deps

        self.paths = [str(p) for p in paths]
        self._source = grain.sources.ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Record:
        data = self._source[index]
        try:
            return msgpack.unpackb(data, raw=False)
        except (ValueError, msgpack.UnpackException) as e:
            raise ValueError(f"record {index} of {self.paths} is not a msgpack record: {e}") from e


class TfdsSource:
    """A TFDS data set read with `tfds.data_sources` (ArrayRecord-backed random access, no
    TensorFlow input pipeline). `fields` maps our record keys to feature names, e.g.
    {"image": "image", "caption": "captions/text"} (a '/' walks nested features)."""

    def __init__(self, name: str, split: str, data_dir: str | None = None, fields: dict[str, str] | None = None):
        try:
            import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
        except ImportError as e:
            raise ImportError(f"TfdsSource({name!r}) needs tensorflow_datasets: pip install tensorflow-datasets") from e
        self.name, self.split = name, split
        self.fields = fields or {"image": "image", "caption": "caption"}
        self._source = tfds.data_sources(name, data_dir=data_dir)[split]

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
            raise ValueError(f"easy-vqa has splits 'train' and 'test', got {split!r}")
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
