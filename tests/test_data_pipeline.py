"""Data sources and the Grain pipeline on a small real data set (easy-vqa images) with planted bad
records: skipping and strict mode, exact resume, host sharding, ArrayRecord round trip, mixtures."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import easy_vqa
import ml_collections
import numpy as np
import pytest
from absl import flags
from PIL import Image

from blip2_jax.data.loader import make_sources
from blip2_jax.data.pipeline import BadRecordError, Mixture, make_pipeline
from blip2_jax.data.sources import (ArrayRecordSource, CachedImages, EasyVqaSource, JsonSource, manifest_path,
                                    read_image, write_array_records)

SIZE = 8
NUM_JPEGS = 25


def process(record: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A stand-in for the BLIP processors: decode, random crop and flip, normalise; a caption must be
    non-empty text. Fails inside processing, as the real processors do, on a bad record."""
    caption = record["caption"]
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"caption must be non-empty text, got {caption!r}")
    pixels = np.asarray(read_image(record["image"]).resize((SIZE + 4, SIZE + 4), Image.BILINEAR), np.float32)
    top, left = rng.integers(0, 5, 2)
    pixels = pixels[top:top + SIZE, left:left + SIZE]
    if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    return {"image": (pixels / 127.5 - 1.0).astype(np.float32), "words": np.int32(len(caption.split())),
            "id": np.asarray(record["id"])}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    """A captions file over easy-vqa images re-encoded as JPEG, plus odd-but-valid and bad records."""
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    questions, answers, image_ids = easy_vqa.get_train_questions()
    paths = easy_vqa.get_train_image_paths()
    annotations, bad = [], []

    def add(image: str, caption, is_bad: bool = False):
        if is_bad:
            bad.append(f"captions.json:{len(annotations)}")
        annotations.append({"image": image, "caption": caption, "image_id": len(annotations)})

    for q, a, image_id in list(zip(questions, answers, image_ids))[:NUM_JPEGS]:
        Image.open(paths[image_id]).convert("RGB").save(root / "images" / f"{image_id}.jpg", quality=90)
        add(f"images/{image_id}.jpg", f"{q} {a}")
    rgb = np.asarray(Image.open(paths[image_ids[0]]).convert("RGB"))
    Image.fromarray(rgb).convert("CMYK").save(root / "images" / "cmyk.jpg")
    Image.fromarray(rgb).convert("L").save(root / "images" / "gray.png")
    Image.fromarray(rgb).convert("RGBA").save(root / "images" / "rgba.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(root / "images" / "deep.png")
    for name in ("cmyk.jpg", "gray.png", "rgba.png", "deep.png"):
        add(f"images/{name}", f"an image stored as {name}")
    add("images/cmyk.jpg", " ".join(["word"] * 300))
    annotations.append({"image": "images/gray.png", "caption": ["a gray image", "shapes in gray"]})

    jpeg = (root / "images" / f"{image_ids[0]}.jpg").read_bytes()
    (root / "images" / "empty.jpg").write_bytes(b"")
    (root / "images" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "images" / "text.jpg").write_bytes(b"this is not an image\n" * 20)
    add("images/missing.jpg", "an image that is not there", is_bad=True)
    add("images/empty.jpg", "a zero-byte file", is_bad=True)
    add("images/truncated.jpg", "half a jpeg", is_bad=True)
    add("images/text.jpg", "text bytes", is_bad=True)
    add(f"images/{image_ids[1]}.jpg", "", is_bad=True)
    add(f"images/{image_ids[1]}.jpg", 42, is_bad=True)
    (root / "captions.json").write_text(json.dumps(annotations))
    source = JsonSource(root / "captions.json", root)
    good = sorted(set(source[i]["id"] for i in range(len(source))) - set(bad))
    return {"root": root, "source": source, "bad": bad, "good": good}


def _ids(batches) -> list[str]:
    return [str(i) for b in batches for i in b["id"]]


def test_epoch_skips_exactly_the_bad_records(dataset):
    assert len(dataset["good"]) == NUM_JPEGS + 7  # the odd modes, the long caption, a 2-caption list
    it = make_pipeline(dataset["source"], process=process, global_batch_size=4, seed=0, num_epochs=1)
    batches = list(it)
    assert all(b["image"].shape == (4, SIZE, SIZE, 3) and b["image"].dtype == np.float32 for b in batches)
    assert sorted(_ids(batches)) == dataset["good"]  # 32 good records: no partial batch dropped
    assert it.stats["skipped"] == len(dataset["bad"])
    assert sorted(it.stats["skipped_ids"]) == sorted(dataset["bad"])
    assert max(b["words"].max() for b in batches) == 300


def test_cached_images_read_the_same_batches_and_skip_the_same_records(dataset):
    """data.cache_images: two epochs through `CachedImages` (each image decoded once, then its kept
    pixels) give the plain source's batches and skips, the odd image modes included."""
    cached = CachedImages(dataset["source"])

    def epochs(source):
        it = make_pipeline(source, process=process, global_batch_size=4, seed=2, num_epochs=2, read_threads=0)
        return list(it), it.stats

    (got, got_stats), (want, want_stats) = epochs(cached), epochs(dataset["source"])
    assert len(got) == len(want) == 2 * (NUM_JPEGS + 7) // 4 and got_stats == want_stats
    for g, w in zip(got, want):
        for key in w:
            np.testing.assert_array_equal(g[key], w[key])
    assert cached[0]["image"] is cached[0]["image"]  # decoded once, then kept
    assert cached[0]["image"].dtype == np.uint8 and isinstance(dataset["source"][0]["image"], str)


def test_strict_raises_on_first_bad_record(dataset):
    it = make_pipeline(dataset["source"], process=process, global_batch_size=4, seed=0, shuffle=False,
                       num_epochs=1, strict=True)
    with pytest.raises(BadRecordError, match=rf"{dataset['bad'][0]} \(image .*missing\.jpg\).*not found"):
        list(it)


@pytest.mark.parametrize("worker_count,read_threads", [(0, 16), (2, 16), (0, 0)])
def test_restored_iterator_continues_exactly(dataset, worker_count, read_threads):
    """Against the default pipeline (16 read threads, no workers): the same batches and positions with
    worker processes, or with records read in the consumer's thread (read_threads=0, the demo's)."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # Grain's worker processes read absl flags (a CLI run parses them)

    def pipeline(workers: int = worker_count, threads: int = read_threads):
        return make_pipeline(dataset["source"], process=process, global_batch_size=4, seed=7, worker_count=workers,
                             read_threads=threads)

    expected = assert_resumes_exactly(pipeline, 14)  # 56 rows: across an epoch boundary (32 good)
    assert _ids(expected[:8]) != _ids(expected[8:16])  # each epoch is shuffled differently


def assert_resumes_exactly(pipeline, batches: int, stop: int = 5) -> list[dict]:
    """`pipeline(workers=0, threads=16)` read `batches` batches; `pipeline()` stopped after `stop`, its
    state through JSON, and a new one restored to it read the rest of them, array for array."""
    reference = pipeline(workers=0, threads=16)  # nor on the number of worker processes or read threads
    expected = [next(reference) for _ in range(batches)]
    reference.close()
    first = pipeline()
    for _ in range(stop):
        next(first)
    state = json.loads(json.dumps(first.get_state()))
    first.close()
    resumed = pipeline()
    resumed.set_state(state)
    for want in expected[stop:]:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    assert resumed.stats == reference.stats
    resumed.close()
    return expected


def test_hosts_read_disjoint_shards_covering_the_data(dataset):
    per_host = [set(_ids(make_pipeline(dataset["source"], process=process, global_batch_size=2, seed=1,
                                       num_epochs=1, process_index=i, process_count=2)))
                for i in range(2)]
    assert not per_host[0] & per_host[1]
    assert sorted(per_host[0] | per_host[1]) == dataset["good"]


def test_data_build_writes_the_json_records_to_array_record(dataset, tmp_path):
    root = dataset["root"]
    prefix = tmp_path / "shards" / "captions"
    result = _data_build(root / "captions.json", root, prefix, 3)
    assert result.returncode == 0, result.stderr
    assert len(list(prefix.parent.glob("captions-*-of-00003.array_record"))) == 3
    assert len(json.loads(manifest_path(prefix).read_text())["shards"]) == 3
    shards = ArrayRecordSource(prefix)
    json_records = [dataset["source"][i] for i in range(len(dataset["source"]))]
    json_records = [r for r in json_records if Path(r["image"]).exists()]  # the missing file can't be stored
    assert len(shards) == len(json_records)
    for stored, original in zip((shards[i] for i in range(len(shards))), json_records):
        assert stored["image"] == Path(original["image"]).read_bytes()
        assert {k: v for k, v in stored.items() if k != "image"} == {k: v for k, v in original.items() if k != "image"}
    it = make_pipeline(shards, process=process, global_batch_size=4, seed=0, num_epochs=1)
    assert sorted(_ids(it)) == dataset["good"]
    stored_ids = {r["id"] for r in json_records}
    assert sorted(it.stats["skipped_ids"]) == sorted(set(dataset["bad"]) & stored_ids)


def _data_build(annotations: Path, image_root: Path, prefix: Path, num_shards: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blip2_jax", "data", "build", "--annotations", str(annotations),
                           "--image_root", str(image_root), "--out", str(prefix), "--num_shards", str(num_shards)],
                          capture_output=True, text=True, check=False)


def test_every_record_bad_is_an_error_within_seconds(dataset, tmp_path):
    """A wrong image root made every record a skip, and the pipeline looped over them for ever."""
    wrong_root = JsonSource(dataset["root"] / "captions.json", tmp_path / "not_the_image_root")
    start = time.perf_counter()
    with pytest.raises(BadRecordError, match=r"none of the 32 records tried could be used; the first: "
                                             r"captions.json:0: InputNotFound: image file .*not_the_image_root"):
        make_pipeline(wrong_root, process=process, global_batch_size=4, seed=0)
    assert time.perf_counter() - start < 5


def test_a_long_run_of_bad_records_stops_the_iteration(dataset):
    """The first record reads (so the start-up check passes), then nothing does: e.g. a bucket unmounted."""
    good = dataset["source"][0]
    records = [good] + [{"id": f"gone{i}", "image": "/nonexistent.jpg", "caption": "x"} for i in range(99)]
    it = make_pipeline(records, process=process, global_batch_size=4, seed=0, shuffle=False, max_bad_in_a_row=20)
    with pytest.raises(BadRecordError, match=r"20 records in a row could not be used.*the first: gone0: "
                                             r"InputNotFound.*; gone1: "):
        next(it)
    assert it.stats["skipped"] == 20


def test_data_build_with_a_wrong_image_root_is_an_error_and_writes_nothing(dataset, tmp_path):
    result = _data_build(dataset["root"] / "captions.json", tmp_path / "wrong", tmp_path / "out" / "captions", 2)
    assert result.returncode != 0
    assert f"none of the {len(dataset['source'])} records has a readable image file, nothing written" in result.stderr
    assert "captions.json:0: " in result.stderr
    assert not (tmp_path / "out").exists()


def _shards(records: int, prefix: Path, num_shards: int) -> list[str]:
    source = [{"id": f"r{i}", "image": b"bytes", "caption": f"caption {i}"} for i in range(records)]
    return write_array_records(source, prefix, num_shards)[0]


def test_rebuild_with_other_num_shards_replaces_the_set(tmp_path):
    """A rebuild used to leave the old shards next to the new: a prefix read them all (duplicates)."""
    prefix = tmp_path / "caps"
    (tmp_path / "caps-00000-of-00002.array_record").write_bytes(b"an unversioned shard of an earlier build")
    (tmp_path / "caps-val-00000-of-00001.array_record").write_bytes(b"another prefix: kept")
    _shards(12, prefix, 3)
    paths = _shards(10, prefix, 2)
    assert sorted(p.name for p in tmp_path.glob("caps-*.array_record")) == sorted(
        [Path(p).name for p in paths] + ["caps-val-00000-of-00001.array_record"])
    source = ArrayRecordSource(prefix)
    assert sorted(source[i]["id"] for i in range(len(source))) == sorted(f"r{i}" for i in range(10))


def test_interrupted_build_leaves_the_previous_set(tmp_path):
    class Failing(list):
        def __getitem__(self, index):
            if index == 7:
                raise KeyboardInterrupt  # as a Ctrl-C half-way through the second shard
            return super().__getitem__(index)

    prefix = tmp_path / "caps"
    before = _shards(6, prefix, 2)
    with pytest.raises(KeyboardInterrupt):
        write_array_records(Failing({"id": f"n{i}", "image": b"x"} for i in range(10)), prefix, 2)
    assert sorted(str(p) for p in tmp_path.iterdir()) == sorted(before + [str(manifest_path(prefix))])
    assert len(ArrayRecordSource(prefix)) == 6


def test_missing_or_changed_shards_are_refused(tmp_path):
    prefix = tmp_path / "caps"
    paths = _shards(9, prefix, 3)
    Path(paths[1]).unlink()
    with pytest.raises(ValueError, match=rf"caps does not match caps.manifest.json: {Path(paths[1]).name} missing"):
        ArrayRecordSource(prefix)
    paths = _shards(9, prefix, 3)
    Path(paths[0]).write_bytes(Path(paths[0]).read_bytes()[:-40])  # cut off, as by a full disk
    with pytest.raises(ValueError, match=rf"{Path(paths[0]).name} unreadable \(Corrupted"):
        ArrayRecordSource(prefix)
    with pytest.raises(FileNotFoundError, match=r"no ArrayRecord set at .*other: .*other.manifest.json not found"):
        ArrayRecordSource(tmp_path / "other")
    paths = _shards(9, prefix, 3)
    Path(paths[2]).write_bytes(Path(_shards(4, tmp_path / "other", 1)[0]).read_bytes())  # a valid, foreign shard
    with pytest.raises(ValueError, match=rf"{Path(paths[2]).name} holds 4 records, the manifest says 3"):
        ArrayRecordSource(prefix)


def test_easy_vqa_source():
    train, test = EasyVqaSource("train"), EasyVqaSource("test")
    assert (len(train), len(test)) == (38575, 9673)
    record = train[0]
    assert record["id"] == "easy_vqa/train:0" and Path(record["image"]).is_file()
    assert record["question"] == "what is the blue shape?" and record["answer"] == ["rectangle"]
    assert all(a in easy_vqa.get_answers() for a in test[5]["answer"])
    assert read_image(record["image"]).mode == "RGB"


def test_mixture_draws_in_proportion_to_weights():
    big = [{"id": f"a{i}", "source": 0} for i in range(10)]
    small = [{"id": f"b{i}", "source": 1} for i in range(30)]
    it = make_pipeline(Mixture([big, small], weights=[3, 1]), process=lambda r, rng: {"source": np.int32(r["source"])},
                       global_batch_size=8, seed=0)
    drawn = np.concatenate([next(it)["source"] for _ in range(50)])
    assert abs(np.mean(drawn == 0) - 0.75) < 0.05
    it = make_pipeline(Mixture([big, small]), process=lambda r, rng: {"source": np.int32(r["source"])},
                       global_batch_size=8, seed=0)  # default: in proportion to size, as LAVIS concatenates
    assert abs(np.mean(np.concatenate([next(it)["source"] for _ in range(50)]) == 0) - 0.25) < 0.05
    it = make_pipeline(Mixture([big, small], balance="sqrt"), process=lambda r, rng: {"source": np.int32(r["source"])},
                       global_batch_size=8, seed=0)  # sqrt(10) : sqrt(30), InstructBLIP's balancing
    share = np.sqrt(10) / (np.sqrt(10) + np.sqrt(30))
    assert abs(np.mean(np.concatenate([next(it)["source"] for _ in range(50)]) == 0) - share) < 0.05


def test_config_mixture_builds_weighted_sources():
    data = ml_collections.ConfigDict(dict(source="easy_vqa", annotations="", image_root="", path="", tfds_name="",
                                          split="train", mixture=[dict(weight=1.0), dict(split="test", weight=3.0)]))
    mixture = make_sources(data)
    assert isinstance(mixture, Mixture) and mixture.proportions() == [1.0, 3.0]
    assert [len(s) for s in mixture.sources] == [len(easy_vqa.get_train_questions()[0]),
                                                 len(easy_vqa.get_test_questions()[0])]
    data.mixture = [dict(), dict(split="test")]  # no weights: in proportion to size, as LAVIS concatenates
    assert make_sources(data).proportions() == [float(len(s)) for s in mixture.sources]
    data.mixture_balance = "sqrt"  # InstructBLIP's balancing: in proportion to the square root of the size
    assert make_sources(data).proportions() == [float(len(s)) ** 0.5 for s in mixture.sources]
    data.mixture = [dict(weight=1.0), dict(split="test", weight=2.0)]
    with pytest.raises(ValueError, match="weights set the proportions themselves: data.mixture_balance='sqrt'"):
        make_sources(data)
    data.mixture_balance = "size"
    data.mixture = [dict(weight=1.0), dict(split="test")]
    with pytest.raises(ValueError, match="for every source or for none"):
        make_sources(data)
    data.mixture_balance = "sqrt"  # the paper's manual adjustments: a source's share scaled after balancing
    data.mixture = [dict(scale=0.5), dict(split="test", task="vqg", scale=2.0)]
    mixture = make_sources(data)
    assert mixture.proportions() == [0.5 * len(mixture.sources[0]) ** 0.5, 2.0 * len(mixture.sources[1]) ** 0.5]
    assert mixture.sources[1][0]["task"] == "vqg" and "task" not in mixture.sources[0][0]
    data.mixture = [dict(weight=1.0), dict(split="test", weight=2.0, scale=2.0)]
    with pytest.raises(ValueError, match="give weights or balance and scales"):
        make_sources(data)
    data.mixture = [dict(task="ocr")]
    with pytest.raises(ValueError, match=r"data.mixture\[0\].task must be one of \['caption', 'vqa', 'vqg'\]"):
        make_sources(data)
    data.mixture_balance = "size"
    data.mixture = [dict(spilt="test")]
    with pytest.raises(ValueError, match=r"data.mixture\[0\] has unknown keys \['spilt'\]"):
        make_sources(data)
    data.mixture = [dict(), dict(weight=0)]
    with pytest.raises(ValueError, match=r"data.mixture\[1\].weight must be a positive number, got 0"):
        make_sources(data)
    data.mixture = [dict(), dict(source="arrayrecord", path="/nonexistent/shards")]
    with pytest.raises(FileNotFoundError, match=r"data.mixture\[1\]: no ArrayRecord set at /nonexistent/shards"):
        make_sources(data)


def assert_restores_exactly(source, worker_count: int) -> None:
    """A pipeline over `source` stopped and restored (with `worker_count` Grain worker processes, each
    given the pickled source) reads the batches the uninterrupted one reads."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # Grain's worker processes read absl flags (a CLI run parses them)

    def pipeline(workers: int = worker_count, threads: int = 16):
        return make_pipeline(source, process=process, global_batch_size=4, seed=3, worker_count=workers,
                             read_threads=threads)

    assert_resumes_exactly(pipeline, 12)  # past an epoch: the order is shuffled per epoch


def assert_hosts_partition(source, good: list[str]) -> None:
    """2 hosts' epochs over `source` read disjoint records whose union is `good`."""
    per_host = [set(_ids(make_pipeline(source, process=process, global_batch_size=2, seed=1, num_epochs=1,
                                       process_index=i, process_count=2))) for i in range(2)]
    assert not per_host[0] & per_host[1]
    assert sorted(per_host[0] | per_host[1]) == good


def train_stage1_tiny(tmp_path: Path, *data_flags: str) -> None:
    """`blip2-jax train` (its own process) of configs/stage1.py:tiny for 2 steps on the `data_flags`
    source, with a BERT vocabulary of the captions' words: both steps log a finite loss."""
    root = Path(__file__).resolve().parents[1]
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "what",
                                                            "color", "is", "the", "shape"]) + "\n")
    proc = subprocess.run([sys.executable, "-m", "blip2_jax", "train", "--config", str(root / "configs/stage1.py:tiny"),
                           "--workdir", str(tmp_path / "run"), *data_flags,
                           f"--config.data.tokenizer={tmp_path / 'bert'}",
                           "--config.total_steps=2", "--config.optim.warmup_steps=0", "--config.mesh.num_devices=2",
                           "--config.log.tensorboard=False"],
                          env=dict(os.environ, PYTHONPATH=str(root)), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == [1, 2]
    assert all(np.isfinite(m["loss"]) for m in lines if "loss" in m)
