"""`data.source=parquet` (issue 23, Done-whens 1 and 2 for Parquet): files written by pyarrow from the
captions set of `test_data_pipeline.py` (image bytes; an empty image cell where the file is missing,
an empty caption cell where the caption is not text), in row groups of 5. Every good record is read
once per epoch, across 2 hosts too; bad rows are skipped and counted; a restored iterator continues
with the same batches; a path column, Hugging Face's image struct and renamed columns read the same
records; `data build --parquet` copies them; a mixture draws them by weight. (Stage-1 training on
Parquet runs in `test_webdataset.py`, in its mixture of every file-based source.)"""
from __future__ import annotations

from pathlib import Path

import ml_collections
import numpy as np
import pyarrow as pa
import pytest
from pyarrow import parquet as pq

from blip2_jax.data.loader import RecordProcessor, make_sources
from blip2_jax.data.parquet import ParquetSource
from blip2_jax.data.pipeline import Mixture, make_pipeline
from blip2_jax.data.sources import ArrayRecordSource
from blip2_jax.data.transforms import blip2_image_train
from blip2_jax.errors import InputNotFound, UserError
from blip2_jax.objectives import stage1
from tests.test_data_pipeline import (_ids, assert_hosts_partition, assert_restores_exactly,  # noqa: F401
                                      dataset, process)

FILES, GROUP = 2, 5


@pytest.fixture(scope="module")
def files(dataset, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("parquet")
    source = dataset["source"]
    rows = [source[i] for i in range(len(source))]
    good, bad = [], []
    for f in range(FILES):
        part = rows[f * len(rows) // FILES:(f + 1) * len(rows) // FILES]
        images = [Path(r["image"]).read_bytes() if Path(r["image"]).is_file() else None for r in part]
        table = pa.table({"image": pa.array(images, pa.binary()),
                          "caption": [r["caption"] if isinstance(r["caption"], str) else None for r in part],
                          "path": [str(Path(r["image"]).relative_to(dataset["root"])) for r in part],
                          "image_id": [str(r["id"]) for r in part]})
        pq.write_table(table, root / f"pairs-{f:05d}.parquet", row_group_size=GROUP)
        for row, r in enumerate(part):
            (bad if r["id"] in dataset["bad"] else good).append(f"pairs-{f:05d}.parquet:{row}")
    return {"root": root, "pattern": str(root / "pairs-{00000..00001}.parquet"), "good": sorted(good),
            "bad": sorted(bad), "json_bad": sorted(dataset["bad"]), "json_good": dataset["good"],
            "image_root": str(dataset["root"])}


def test_an_epoch_reads_every_good_row_once_and_counts_the_bad(files):
    source = ParquetSource(files["pattern"])
    assert len(source) == len(files["good"]) + len(files["bad"])
    it = make_pipeline(source, process=process, global_batch_size=2, seed=0, num_epochs=1)
    assert sorted(_ids(list(it))) == files["good"]
    assert sorted(it.stats["skipped_ids"]) == files["bad"] and it.stats["skipped"] == len(files["bad"])


def test_a_path_column_or_an_image_struct_reads_the_same_images(files, tmp_path):
    by_path = ParquetSource(files["pattern"], image_column="path", id_column="image_id",
                            image_root=files["image_root"])
    it = make_pipeline(by_path, process=process, global_batch_size=2, seed=0, num_epochs=1)
    assert sorted(_ids(list(it))) == files["json_good"]  # ids from the id column: the JSON source's
    assert sorted(it.stats["skipped_ids"]) == files["json_bad"]
    table = pq.read_table(files["root"] / "pairs-00000.parquet")
    struct = pa.StructArray.from_arrays([table["image"].combine_chunks(), table["path"].combine_chunks()],
                                        names=["bytes", "path"])
    pq.write_table(pa.table({"img": struct, "text": table["caption"]}), tmp_path / "hf.parquet", row_group_size=3)
    hf = ParquetSource(str(tmp_path / "hf.parquet"), image_column="img", caption_column="text")
    plain = ParquetSource(str(files["root"] / "pairs-00000.parquet"))
    for i in range(len(plain)):
        if plain[i]["image"] is not None:
            assert hf[i]["image"] == plain[i]["image"] and hf[i]["caption"] == plain[i]["caption"]


def test_two_hosts_read_disjoint_rows_covering_the_set(files):
    assert_hosts_partition(ParquetSource(files["pattern"]), files["good"])


@pytest.mark.parametrize("worker_count", [0, 2])
def test_a_restored_iterator_reads_the_same_batches(files, worker_count):
    assert_restores_exactly(ParquetSource(files["pattern"]), worker_count)


def test_missing_files_columns_and_foreign_files_are_one_line_errors(files, tmp_path):
    with pytest.raises(InputNotFound, match="Parquet files not found: .*pairs-00009.parquet"):
        ParquetSource(str(files["root"] / "pairs-{00008..00009}.parquet"))
    with pytest.raises(UserError, match="has no column jpg; it has caption, image, image_id, path"):
        ParquetSource(files["pattern"], image_column="jpg")
    (tmp_path / "x.parquet").write_bytes(b"not parquet" * 100)
    with pytest.raises(UserError, match="x.parquet: not a readable Parquet file"):
        ParquetSource(str(tmp_path / "x.parquet"))


def test_data_build_and_a_mixture_read_the_rows(files, dataset, tmp_path, blip2_jax):  # noqa: F811
    code, out, err = blip2_jax("data", "build", "--parquet", files["pattern"], "--out", str(tmp_path / "ar" / "p"))
    assert code == 0, err
    assert "1 left out" in out  # the row without image bytes
    built = ArrayRecordSource(tmp_path / "ar" / "p")
    source = ParquetSource(files["pattern"])
    copied = {built[i]["id"]: built[i] for i in range(len(built))}
    for i in range(len(source)):
        if source.record_id(i) in copied:
            assert copied[source.record_id(i)]["image"] == source[i]["image"]
    data = ml_collections.ConfigDict(dict(
        source="json", annotations=str(dataset["root"] / "captions.json"), image_root=str(dataset["root"]), path="",
        tfds_name="", split="train", columns="", mixture=[dict(source="parquet", path=files["pattern"], weight=3.0),
                                                          dict(weight=1.0)]))
    mixture = make_sources(data)
    assert isinstance(mixture, Mixture) and mixture.proportions() == [3.0, 1.0]
    it = make_pipeline(mixture, process=lambda r, rng: {"pq": np.int32(".parquet:" in r["id"])}, global_batch_size=8,
                       seed=0)
    assert abs(np.mean(np.concatenate([next(it)["pq"] for _ in range(60)])) - 0.75) < 0.06


def test_a_row_with_several_captions_trains_on_one_drawn_per_epoch(files, tmp_path):
    """A list column (or a tar sample's .json caption list) is several captions of one image, as
    BLIP-2's CapFilt keeps two: each epoch's draw tokenises one of them, the record's generator picks."""
    table = pq.read_table(files["root"] / "pairs-00000.parquet").slice(0, 2)
    table = table.set_column(1, "caption", pa.array([["what color", "is the shape"], ["what shape"]]))
    pq.write_table(table, tmp_path / "lists.parquet")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "what",
                                                            "color", "is", "the", "shape"]) + "\n")
    processor = RecordProcessor("stage1", stage1.batch_spec(32, 8), blip2_image_train(32), str(tmp_path / "bert"), 8)
    record = ParquetSource(str(tmp_path / "lists.parquet"))[0]
    single = {c: processor({**record, "caption": c}, np.random.default_rng(0))["text_ids"].tolist()
              for c in record["caption"]}
    drawn = [processor(record, np.random.default_rng(seed))["text_ids"].tolist() for seed in range(12)]
    assert all(d in single.values() for d in drawn) and len({tuple(d) for d in drawn}) == 2
