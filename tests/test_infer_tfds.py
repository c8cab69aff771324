"""`blip2-jax infer caption --tfds NAME:SPLIT`: a TFDS data set (prepared by tensorflow-datasets
itself, `tests/test_tfds.py`) captioned record by record, as the generation API captions the same
decoded images."""
import dataclasses

from blip2_jax.data.sources import TfdsSource
from blip2_jax.generation.api import Blip2Generator
from blip2_jax.generation.config import CAPTION
from tests.reference import hf_models as ref
from tests.reference.tokenizers import tiny_opt_tokenizer
from tests.test_infer import _parquet
from tests.test_tfds import NUM, data_dir  # pylint: disable=unused-import  # a fixture


def test_tfds_records_caption_as_the_generation_api(data_dir, tmp_path, blip2_jax):  # noqa: F811
    ref.generation_model(ref.OPT, seed=31).save_pretrained(tmp_path / "opt")
    tiny_opt_tokenizer().save_pretrained(tmp_path / "opt")
    code, _, err = blip2_jax("infer", "caption", "--checkpoint", str(tmp_path / "opt"), "--tfds", "tiny_captions:train",
                             "--tfds_data_dir", str(data_dir), "--out", str(tmp_path / "out"), "--shard_size=8",
                             "--num_beams=2", "--max_new_tokens=4")
    assert code == 0, err
    rows = [_parquet(tmp_path / "out" / f"shard-0000{k}-of-00002.parquet") for k in range(2)]
    assert sum((r["id"] for r in rows), []) == [f"tiny_captions/train:{i}" for i in range(NUM)]
    source = TfdsSource("tiny_captions", "train", str(data_dir))
    search = dataclasses.replace(CAPTION, num_beams=2, max_new_tokens=4, min_length=4)
    want = Blip2Generator.from_pretrained(tmp_path / "opt", batch_size=4).caption(
        [source[i]["image"] for i in range(NUM)], "", search)
    assert sum((r["caption"] for r in rows), []) == want
