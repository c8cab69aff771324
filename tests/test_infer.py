"""`blip2-jax infer` (issue 22, Done-whens 2 and 4): captions, answers and features of a whole set
into shards. A run killed between shards (its next shard half-written) continues at that shard and
ends with files byte for byte those of an uninterrupted run; 1 device, 8 devices and 2 processes x 4
write the same bytes; an unreadable image is skipped and listed, not fatal; the texts equal the
generation API's and the features the extractor's; another run into the same directory is refused.
CapFilt's kept captions are the best by the ranker's ITC and train; search ranks as the retrieval
evaluator."""
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from blip2_jax.data import easy_vqa
from blip2_jax.data.sources import JsonSource
from blip2_jax.evaluate.generation import generate_texts
from blip2_jax.evaluate.model import generation_tokenizers, load_model
from blip2_jax.evaluate.retrieval import retrieval_scores
from blip2_jax.features import FeatureExtractor
from blip2_jax.infer.capfilt import image_keys
from blip2_jax.parallel import mesh as mesh_lib
from blip2_jax.generation.api import Blip2Generator
from blip2_jax.generation.config import CAPFILT, CAPTION, PROMPTS, VQA_OPT
from tests.reference import hf_models as ref
from tests.reference.tokenizers import tiny_opt_tokenizer
from tests.test_cli_errors import user_error

ROOT = Path(__file__).resolve().parents[1]
SEARCH = ["--num_beams=2", "--max_new_tokens=4"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny OPT BLIP-2 and a retrieval model (HF directories), 7 images (one in a subdirectory)
    and a file that claims to be an image but is not."""
    root = tmp_path_factory.mktemp("infer")
    ref.generation_model(ref.OPT, seed=31).save_pretrained(root / "opt")
    tiny_opt_tokenizer().save_pretrained(root / "opt")
    ref.retrieval_model(seed=32).save_pretrained(root / "itm")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", *easy_vqa.COLORS, *easy_vqa.SHAPES, "photo", "of"]
    (root / "itm" / "vocab.txt").write_text("\n".join(words + [f"w{i}" for i in range(60)]) + "\n")  # its BERT's
    rng = np.random.default_rng(5)
    (root / "images" / "more").mkdir(parents=True)
    for i in range(7):
        where = root / "images" / ("more" if i == 6 else "") / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (24 + 2 * i, 30, 3), dtype=np.uint8)).save(where)
    (root / "images" / "3b.png").write_bytes(b"not a png")
    return root


def _files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _parquet(path):
    from pyarrow import parquet as pq  # pylint: disable=import-outside-toplevel

    return pq.read_table(path).to_pydict()


def test_captions_resume_byte_for_byte_on_any_device_count(data, tmp_path, blip2_jax):
    args = ["infer", "caption", "--checkpoint", str(data / "opt"), "--images", str(data / "images"),
            "--shard_size=3", "--batch_size=2", *SEARCH]
    code, out, err = blip2_jax(*args, "--out", str(tmp_path / "full"))
    assert code == 0, err
    summary = json.loads(out[out.index("{"):])
    assert summary["shards"] == 3 and summary["images"] == 7 and summary["bad_images"] == 1
    full = _files(tmp_path / "full")
    assert sorted(full) == ["run.json", "shard-00000-of-00003.parquet", "shard-00001-of-00003.bad.json",
                            "shard-00001-of-00003.parquet", "shard-00002-of-00003.parquet"]
    bad = json.loads(full["shard-00001-of-00003.bad.json"])
    assert [b["id"] for b in bad] == ["3b.png"] and bad[0]["cause"]
    rows = [_parquet(tmp_path / "full" / f"shard-0000{k}-of-00003.parquet") for k in range(3)]
    ids = sum((r["id"] for r in rows), [])
    assert ids == ["0.png", "1.png", "2.png", "3.png", "4.png", "5.png", "more/6.png"]
    generator = Blip2Generator.from_pretrained(data / "opt", batch_size=4)
    search = dataclasses.replace(CAPTION, num_beams=2, max_new_tokens=4, min_length=4)
    assert sum((r["caption"] for r in rows), []) == generator.caption([str(data / "images" / i) for i in ids], "",
                                                                      search)

    # killed while writing its last shard: that shard is missing, a half-written file lies beside it
    shutil.copytree(tmp_path / "full", tmp_path / "killed")
    (tmp_path / "killed" / "shard-00002-of-00003.parquet").rename(tmp_path / "killed" / "x.parquet.partial")
    code, out, err = blip2_jax(*args, "--out", str(tmp_path / "killed"))
    assert code == 0, err
    assert json.loads(out[out.index("{"):])["skipped_shards"] == 2
    assert _files(tmp_path / "killed") == full

    code, _, err = blip2_jax(*args, "--num_devices=1", "--out", str(tmp_path / "one"))
    assert code == 0, err
    assert _files(tmp_path / "one") == full

    code, _, err = blip2_jax(*args, "--prompt=a photo of", "--out", str(tmp_path / "full"))
    assert "holds the output of another run (differs in prompt)" in user_error(code, err)
    assert _files(tmp_path / "full") == full  # nothing of the refused run written


def test_answers_and_features_equal_the_library(data, tmp_path, blip2_jax):
    records = [{"question_id": 10 + i, "image": f"{i}.png", "question": q}
               for i, q in enumerate(["what is the w1", "w2 w3", "is w4 the w5"])]
    (tmp_path / "q.json").write_text(json.dumps(records))
    code, _, err = blip2_jax("infer", "answer", "--checkpoint", str(data / "opt"), "--annotations",
                             str(tmp_path / "q.json"), "--image_root", str(data / "images"), "--out",
                             str(tmp_path / "answers"), "--shard_size=2", *SEARCH)
    assert code == 0, err
    rows = [_parquet(tmp_path / "answers" / f"shard-0000{k}-of-00002.parquet") for k in range(2)]
    assert sum((r["id"] for r in rows), []) == ["10", "11", "12"]
    generator = Blip2Generator.from_pretrained(data / "opt", batch_size=4)
    search = dataclasses.replace(VQA_OPT, num_beams=2, max_new_tokens=4)
    want = generator.answer([str(data / "images" / r["image"]) for r in records], [r["question"] for r in records],
                            PROMPTS["vqa_opt"], search)
    assert sum((r["answer"] for r in rows), []) == want
    # the same records as an ArrayRecord set (images inside): the same shards
    code, _, err = blip2_jax("data", "build", "--annotations", str(tmp_path / "q.json"), "--image_root",
                             str(data / "images"), "--out", str(tmp_path / "ar" / "q"))
    assert code == 0, err
    code, _, err = blip2_jax("infer", "answer", "--checkpoint", str(data / "opt"), "--arrayrecord",
                             str(tmp_path / "ar" / "q"), "--out", str(tmp_path / "ar_answers"), "--shard_size=2", *SEARCH)
    assert code == 0, err
    from_json, from_arrayrecord = _files(tmp_path / "answers"), _files(tmp_path / "ar_answers")
    assert from_json.pop("run.json") != from_arrayrecord.pop("run.json") and from_arrayrecord == from_json

    code, _, err = blip2_jax("infer", "embed", "--checkpoint", str(data / "itm"), "--images", str(data / "images"),
                             "--out", str(tmp_path / "emb"), "--shard_size=4", "--feature=itc_image")
    assert code == 0, err
    ids = sum((json.loads((tmp_path / "emb" / f"shard-0000{k}-of-00002.ids.json").read_text()) for k in range(2)), [])
    got = np.concatenate([np.load(tmp_path / "emb" / f"shard-0000{k}-of-00002.npy") for k in range(2)])
    want = FeatureExtractor.from_pretrained(data / "itm").images([str(data / "images" / i) for i in ids])
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert len(ids) == 7 and got.dtype == np.float32
    code, _, err = blip2_jax("infer", "embed", "--checkpoint", str(data / "itm"), "--images", str(data / "images"),
                             "--out", str(tmp_path / "emb1"), "--shard_size=4", "--feature=itc_image", "--num_devices=1")
    assert code == 0, err
    assert _files(tmp_path / "emb1") == _files(tmp_path / "emb")  # the features, over 1 device or 8, and the index


@pytest.mark.parametrize("args,expected", [
    (["--images", "/nonexistent/dir"], "--images /nonexistent/dir: not a directory"),
    ([], "infer caption needs one input: (--images DIR | --annotations FILE"),
    (["--images", "/x", "--arrayrecord", "/y"], "infer caption needs one input"),
    (["--arrayrecord", "/nonexistent/set"], "no ArrayRecord set at /nonexistent/set"),
    (["--tfds", "coco"], "--tfds 'coco': expected NAME:SPLIT"),
])
def test_bad_inputs_are_one_line_errors(data, tmp_path, blip2_jax, args, expected):
    code, _, err = blip2_jax("infer", "caption", "--checkpoint", str(data / "opt"), "--out", str(tmp_path / "o"),
                             *args)
    assert expected in (user_error(code, err) if code == 2 else err)
    assert not (tmp_path / "o").exists()


def test_a_feature_the_model_lacks_is_refused_before_any_output(data, tmp_path, blip2_jax):
    code, _, err = blip2_jax("infer", "embed", "--checkpoint", str(data / "opt"), "--images", str(data / "images"),
                             "--out", str(tmp_path / "o"), "--feature=itc_image")
    assert "itc_image needs a retrieval model" in user_error(code, err)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_capfilt_recaptions_easy_vqa_into_a_set_training_reads(data, tmp_path, blip2_jax):
    """Done-when 4: 3 sampled captions per easy-VQA image ranked by ITC with the image's own two
    (an image's records merged), the best 2 kept. The scores are the ITC of the ranker's features,
    an image's samples are those it draws alone with its key (batch- and mesh-independent), the
    output is the same bytes on 1 device and 8 and after a kill, and stage-1 training reads it."""
    records = easy_vqa.caption_records("train")[:7]
    image_root = str(Path(records[0]["image"]).parent)
    ann = [{"image": Path(r["image"]).name, "image_id": r["image_id"], "caption": r["caption"]} for r in records]
    ann.append({**ann[0], "caption": "a photo of a circle"})  # a second record of image 0
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    args = ["infer", "capfilt", "--checkpoint", str(data / "opt"), "--ranker", str(data / "itm"), "--annotations",
            str(tmp_path / "ann.json"), "--image_root", image_root, "--num_captions=3", "--keep=2",
            "--max_new_tokens=4", "--shard_size=4", "--batch_size=2"]
    code, out, err = blip2_jax(*args, "--out", str(tmp_path / "full"))
    assert code == 0, err
    assert json.loads(out[out.index("{"):])["images"] == 7
    full = _files(tmp_path / "full")
    assert sorted(full) == ["annotations.json", "run.json", "shard-00000-of-00002.parquet",
                            "shard-00001-of-00002.parquet"]
    rows = [_parquet(tmp_path / "full" / f"shard-0000{k}-of-00002.parquet") for k in range(2)]
    table = {k: sum((r[k] for r in rows), []) for k in rows[0]}
    assert table["id"] == [str(r["image_id"]) for r in records]
    own = [[r["caption"]] for r in records]
    own[0].append("a photo of a circle")

    ids = table["id"]
    one_device = mesh_lib.make_mesh(-1, 1, 1, jax.devices()[:1])
    model = load_model(str(data / "opt"), one_device)
    search = dataclasses.replace(CAPFILT, max_new_tokens=4, min_length=4, num_return_sequences=3)
    images = [r["image"] for r in records]
    extractor = FeatureExtractor.from_pretrained(data / "itm")
    image_rows = extractor.images(images)
    for j, candidates in enumerate(table["candidates"]):
        alone = generate_texts(model, one_device, images[j:j + 1], [""], config=search, batch_size=1,
                               rngs=image_keys(ids[j:j + 1], 0), **generation_tokenizers(model, ""))
        assert candidates == list(dict.fromkeys(own[j] + alone))  # its own first, then its samples, once each
        scores = np.max(image_rows[j] @ extractor.texts(candidates)[:, 0].T, axis=0)
        np.testing.assert_allclose(table["candidate_scores"][j], scores, atol=1e-6)
        best = np.argsort(-scores, kind="stable")[:2]
        assert table["captions"][j] == [candidates[i] for i in best]
    assert len({tuple(c) for c in table["candidates"]}) == 7 and any(len(c) > 3 for c in table["candidates"])

    code, _, err = blip2_jax(*args, "--num_devices=1", "--out", str(tmp_path / "one"))
    assert code == 0, err
    assert _files(tmp_path / "one") == full
    shutil.copytree(tmp_path / "full", tmp_path / "killed")  # killed while writing its last shard
    (tmp_path / "killed" / "shard-00001-of-00002.parquet").rename(tmp_path / "killed" / "x.parquet.partial")
    (tmp_path / "killed" / "annotations.json").unlink()
    code, _, err = blip2_jax(*args, "--out", str(tmp_path / "killed"))
    assert code == 0, err
    assert _files(tmp_path / "killed") == full

    kept = JsonSource(tmp_path / "full" / "annotations.json", image_root)
    assert [r["caption"] for r in kept] == sum(table["captions"], [])  # one training pair per kept caption
    # the console script in its own process (grain's flags are absl flags the in-process runner would save over)
    proc = subprocess.run([sys.executable, "-m", "blip2_jax", "train", "--config", str(ROOT / "configs/stage1.py:tiny"),
                           "--workdir", str(tmp_path / "train"), "--config.data.source=json",
                           f"--config.data.annotations={tmp_path / 'full' / 'annotations.json'}",
                           f"--config.data.image_root={image_root}", f"--config.data.tokenizer={data / 'itm'}",
                           "--config.data.positives=image_id", "--config.total_steps=1",
                           "--config.optim.warmup_steps=0",
                           "--config.mesh.num_devices=2", "--config.log.tensorboard=False"],
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 1 |" in proc.stdout + proc.stderr and "data_skipped=0" in proc.stdout + proc.stderr

    # the next round: the trained stage-1 model captions with its Q-Former's decoder and ranks by its ITC
    code, _, err = blip2_jax("infer", "capfilt", "--checkpoint", str(tmp_path / "train"), "--ranker",
                             str(tmp_path / "train"), "--annotations", str(tmp_path / "full" / "annotations.json"),
                             "--image_root", image_root, "--num_captions=2", "--keep=1", "--max_new_tokens=4",
                             "--min_length=1", "--out", str(tmp_path / "round2"))
    assert code == 0, err
    again = json.loads((tmp_path / "round2" / "annotations.json").read_text())
    assert [a["image"] for a in again] == table["image"] and all(len(a["caption"]) == 1 for a in again)
    second = _parquet(tmp_path / "round2" / "shard-00000-of-00001.parquet")
    assert all(c[:2] == kept for c, kept in zip(second["candidates"], table["captions"]))  # its own first
    assert any(len(c) > 2 for c in second["candidates"])  # and what the decoder sampled


def test_search_ranks_an_embedded_set_as_the_retrieval_evaluator(data, tmp_path, blip2_jax):
    """`infer embed --feature itc_image` leaves an index (N*Q rows, FAISS-style flat); `infer search`
    ranks its images for each query by the ITC scores `blip2-jax eval`'s retrieval evaluator computes."""
    code, _, err = blip2_jax("infer", "embed", "--checkpoint", str(data / "itm"), "--images", str(data / "images"),
                             "--out", str(tmp_path / "emb"), "--shard_size=3", "--feature=itc_image")
    assert code == 0, err
    meta = json.loads((tmp_path / "emb" / "index.json").read_text())
    ids = json.loads((tmp_path / "emb" / "index.ids.json").read_text())
    matrix = np.load(tmp_path / "emb" / "index.npy")
    assert ids == ["0.png", "1.png", "2.png", "3.png", "4.png", "5.png", "more/6.png"]  # 3b.png is no image
    assert matrix.shape == (7 * meta["queries"], meta["dim"]) and meta["images"] == 7
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, rtol=1e-5)

    queries = ["a red circle", "w1 w2 photo"]
    code, out, err = blip2_jax("infer", "search", "--index", str(tmp_path / "emb"), "--query", queries[0],
                               "--query", queries[1], "--top_k=4")
    assert code == 0, err
    found = json.loads(out[out.index("["):])
    model = load_model(str(data / "itm"), mesh_lib.make_mesh(-1, 1, 1, jax.devices()[:1]))
    extractor = FeatureExtractor.from_pretrained(data / "itm")
    evaluated = retrieval_scores(model, mesh_lib.make_mesh(-1, 1, 1, jax.devices()[:1]),
                                 [str(data / "images" / i) for i in ids], queries, extractor.tokenizer, k_test=0,
                                 batch_size=2)
    for t, result in enumerate(found):
        assert result["query"] == queries[t]
        want = np.argsort(-evaluated.sims[:, t], kind="stable")[:4]
        assert [r["id"] for r in result["results"]] == [ids[i] for i in want]
        np.testing.assert_allclose([r["score"] for r in result["results"]], evaluated.sims[want, t], atol=1e-5)

    code, _, err = blip2_jax("infer", "search", "--index", str(tmp_path), "--query", "x")
    assert f"--index {tmp_path}: no index.json" in user_error(code, err)


@pytest.mark.slow
def test_two_processes_write_what_one_process_writes(data, tmp_path, blip2_jax):
    """Done-when 2 across hosts: capfilt (sampling over the global mesh, each process its rows of a
    batch; the ranker on each process's own device) as 2 processes x 4 devices through the launcher
    users run (launch/local.sh), against 1 process x 8 devices: the same bytes."""
    args = ["infer", "capfilt", "--checkpoint", str(data / "opt"), "--ranker", str(data / "itm"), "--images",
            str(data / "images"), "--shard_size=3", "--batch_size=1", "--num_captions=3", "--max_new_tokens=4"]
    code, _, err = blip2_jax(*args, "--out", str(tmp_path / "one"))
    assert code == 0, err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = [str(ROOT / "launch/local.sh"), "-n", "2", "-d", "4", "-p", str(port), "--", *args, "--out",
                str(tmp_path / "two")]
    env = dict(os.environ, BLIP2_JAX=f"{sys.executable} -m blip2_jax", LOG_DIR=str(tmp_path / "logs"),
               PYTHONPATH=str(ROOT))
    launched = subprocess.run(launcher, env=env, capture_output=True, text=True, timeout=600)
    logs = "".join(p.read_text()[-2000:] for p in sorted((tmp_path / "logs").glob("process_*.log")))
    assert launched.returncode == 0, launched.stderr + logs
    assert _files(tmp_path / "two") == _files(tmp_path / "one")
    assert "shard-00001-of-00003.bad.json" in _files(tmp_path / "two")  # 3b.png: listed once, by process 0
