"""`data.source=tfds` on a real TFDS data set: tensorflow-datasets itself prepares a small image +
caption set in the array_record file format (no TensorFlow: images go in as PIL images, which TFDS
encodes and decodes with PIL), and we read it back through `TfdsSource`, the Grain pipeline and the
trainer's loader. The TFDS path called `tfds.data_sources`, which tensorflow-datasets does not have."""
import sys

import easy_vqa
import numpy as np
import pytest
from PIL import Image

from blip2_jax.data.loader import make_loader, make_sources
from blip2_jax.data.pipeline import make_pipeline
from blip2_jax.data.sources import TfdsSource
from blip2_jax.data.transforms import blip_image_eval
from blip2_jax.models import presets
from blip2_jax.train.layout import data_args
from tests.test_train import load_config
from tests.test_train_data import tokenizer_dir  # pylint: disable=unused-import  # a fixture

tfds = pytest.importorskip("tensorflow_datasets")  # in the [test] extra: CI runs this
NUM = 12


def _examples() -> list[dict]:
    """easy-vqa images as RGB and a caption from each one's question and answer."""
    questions, answers, image_ids = easy_vqa.get_train_questions()
    paths = easy_vqa.get_train_image_paths()
    return [{"image": Image.open(paths[image_ids[i]]).convert("RGB"), "caption": f"{questions[i]} {answers[i]}"}
            for i in range(NUM)]


class TinyCaptions(tfds.core.GeneratorBasedBuilder):
    """Registered with TFDS as `tiny_captions`."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)), "caption": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        yield from enumerate(_examples())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tfds")
    TinyCaptions(data_dir=str(directory), file_format="array_record").download_and_prepare()
    assert "tensorflow" not in sys.modules  # built and read without TensorFlow
    return directory


def _data(**fields):
    config = load_config("configs/stage2_opt.py", "tiny")
    config.data.update(source="tfds", tfds_name="tiny_captions", split="train", **fields)
    return config


def test_tfds_source_reads_the_prepared_set_through_the_pipeline(data_dir):
    source = make_sources(_data(path=str(data_dir)).data)
    assert isinstance(source, TfdsSource) and len(source) == NUM
    written = {e["caption"]: np.asarray(e["image"]) for e in _examples()}
    record = source[3]
    assert record["id"] == "tiny_captions/train:3" and isinstance(record["caption"], str)
    np.testing.assert_array_equal(record["image"], written[record["caption"]])  # PNG: lossless

    it = make_pipeline(source, process=lambda r, rng: {"caption": np.asarray(r["caption"]),
                                                         "sum": np.int64(np.asarray(r["image"], np.int64).sum())},
                       global_batch_size=4, seed=0, num_epochs=1)
    read = {str(c): int(s) for b in it for c, s in zip(b["caption"], b["sum"])}
    assert read == {c: int(x.astype(np.int64).sum()) for c, x in written.items()}


def test_trainer_loader_batches_a_tfds_set(data_dir, tokenizer_dir):
    config = _data(path=str(data_dir), tokenizer=str(tokenizer_dir), transform="blip_image_eval", text_length=20)
    batch = make_loader(config, **data_args(config, presets.get("tiny"))).next()
    expected = np.stack([blip_image_eval(32)(e["image"]) for e in _examples()])
    for row in batch["image"]:  # each row is one of the set's images, resized and normalised
        assert np.abs(expected - row).max(axis=(1, 2, 3)).min() < 1e-6
    assert ((batch["labels"] >= 0).sum(1) >= 2).all()  # caption tokens and "\n" are targets


def test_tfds_source_says_what_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # as if not installed
    with pytest.raises(ImportError, match="coco_captions.*pip install tensorflow-datasets"):
        TfdsSource("coco_captions", "train")
