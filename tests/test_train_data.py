"""Training on a real data set (the packaged easy-VQA images and questions) through the Grain
pipeline: the run stopped after 2 steps and started again continues with exactly the batches,
losses and parameters of the uninterrupted run, because the iterator position is in the checkpoint."""
import json

import easy_vqa
import jax
import numpy as np
import pytest

from blip2_jax.checkpoint import Checkpointer
from blip2_jax.data import tokenizers
from blip2_jax.data.loader import make_loader
from blip2_jax.demo import configs as demo_configs
from blip2_jax.demo import tokenizers as demo_tokenizers
from blip2_jax.models import presets
from blip2_jax.train.layout import data_args
from blip2_jax.train import loop
from tests.reference.tokenizers import word_tokenizer
from tests.test_train import load_config

pytestmark = pytest.mark.slow
STEPS = 4


def _words() -> list[str]:
    questions = easy_vqa.get_train_questions()[0] + easy_vqa.get_test_questions()[0]
    words = {w for q in questions for w in q.lower().replace("?", " ").split()} | set(easy_vqa.get_answers())
    return sorted(words) + ["question:", "answer:"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("opt_tokenizer")
    vocabulary = ["<s>", "<pad>", "</s>", "<unk>", "\n"] + _words()  # tiny OPT: pad 1, vocab 128
    assert len(vocabulary) <= presets.get("tiny").text.vocab_size
    word_tokenizer(vocabulary, "<s> $A", {"<s>": 0}, bos_token="<s>", eos_token="</s>",
                   pad_token="<pad>").save_pretrained(directory)
    return directory


def _config(tokenizer_dir, total_steps):
    config = load_config("configs/stage2_opt.py", "tiny")
    config.data.update(source="easy_vqa", tokenizer=str(tokenizer_dir), prompt="question: {} answer:", text_length=20)
    config.update(total_steps=total_steps)
    config.optim.update(total_steps=STEPS, warmup_steps=1)  # the same schedule for both runs
    config.checkpoint.update(every=1, async_save=False)
    config.log.update(every=1, tensorboard=False)
    return config


def _params(workdir):
    ckpt = Checkpointer(workdir, save_every=1)
    params = jax.device_get(ckpt.restore_arrays()["params"])
    ckpt.close()
    return params


def test_batches_are_processed_easy_vqa_records(tokenizer_dir):
    config = _config(tokenizer_dir, STEPS)
    batch = make_loader(config, **data_args(config, presets.get("tiny"))).next()
    assert batch["image"].shape == (config.batch_size, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["text_ids"].shape == batch["labels"].shape == (config.batch_size, config.data.text_length)
    # the prompt ("question: ... answer:") is masked; the answer and "\n" are targets
    assert ((batch["labels"] >= 0).sum(1) >= 2).all() and (batch["labels"][:, :3] == -100).all()


@pytest.mark.parametrize("stage", ["lm", "stage1", "stage2"])
def test_the_demo_reads_the_batches_of_the_default_pipeline(tmp_path, monkeypatch, stage):
    """The demo's data settings (records read in the trainer's thread, images decoded once, the
    tokenizer's ids remembered) against the pipeline without them (16 read threads, every image
    decoded and every text tokenised by the Hugging Face call each time): the same batches and
    position (images read again from memory: test_data_pipeline's two epochs)."""
    demo_tokenizers.write_qformer_tokenizer(tmp_path / "tokenizers" / "qformer")
    demo_tokenizers.write_language_tokenizer(tmp_path / "tokenizers" / "lm")
    config = demo_configs.train_config(stage, tmp_path)
    assert config.data.read_threads == 0 and config.data.cache_images
    model_cfg = presets.from_config_dict(config.model)
    ours = make_loader(config, **data_args(config, model_cfg))
    got = [ours.next() for _ in range(4)]
    config.data.update(read_threads=16, cache_images=False)
    monkeypatch.setattr(tokenizers, "Memoized", lambda tokenizer: tokenizer)
    reference = make_loader(config, **data_args(config, model_cfg))
    for batch in got:
        want = reference.next()
        assert batch.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(batch[key], want[key], err_msg=key)
    assert ours.get_state() == reference.get_state()


def test_mixture_alone_replaces_the_synthetic_default(tokenizer_dir):
    """`data.mixture` names its own sources: with `data.source` left at 'synthetic' the batches are
    still the mixture's easy-VQA records (the prompt masked out of the labels), not random arrays."""
    config = _config(tokenizer_dir, STEPS)
    config.data.update(source="synthetic", mixture=[dict(source="easy_vqa"), dict(source="easy_vqa", split="test")])
    batch = make_loader(config, **data_args(config, presets.get("tiny"))).next()
    assert batch["labels"].shape == (config.batch_size, config.data.text_length)
    assert (batch["labels"][:, :3] == -100).all() and ((batch["labels"] >= 0).sum(1) >= 2).all()


def test_prefix_lm_is_refused_outside_flant5(tokenizer_dir):
    config = _config(tokenizer_dir, STEPS)
    config.data.prefix_lm = True
    with pytest.raises(ValueError, match="prefix_lm is FlanT5's prefix-LM split.*this run is stage2_opt"):
        make_loader(config, **data_args(config, presets.get("tiny")))


def test_stopped_and_restarted_run_reads_the_same_batches(tokenizer_dir, tmp_path):
    loop.train(_config(tokenizer_dir, STEPS), tmp_path / "straight")
    loop.train(_config(tokenizer_dir, 2), tmp_path / "resumed")
    loop.train(_config(tokenizer_dir, STEPS), tmp_path / "resumed")
    read = {name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("straight", "resumed")}
    assert [m["step"] for m in read["resumed"]] == list(range(1, STEPS + 1))
    assert [m["loss"] for m in read["resumed"]] == [m["loss"] for m in read["straight"]]
    assert all(m["data_skipped"] == 0 for m in read["straight"])
    for a, b in zip(jax.tree.leaves(_params(tmp_path / "straight")), jax.tree.leaves(_params(tmp_path / "resumed"))):
        np.testing.assert_array_equal(a, b)
