"""`blip2-jax demo`'s chain at a few steps a run: every stage trains and checkpoints, both evaluations
cover the whole test split, the export is answered by `transformers` exactly as by us, the table
prints, and a second call resumes (trains no finished stage again). The figures at the default steps
are the README's, from `blip2-jax demo` itself."""
import json
import os

import jax
import pytest

from blip2_jax.demo import run as demo_run

pytestmark = pytest.mark.slow  # three small trainings, two evaluations and an export (~2 min)

STEPS = {"lm": 4, "stage1": 4, "stage2": 4}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    assert jax.device_count() == 8  # the backend starts here, with conftest's devices
    with pytest.MonkeyPatch.context() as patch:  # as `blip2-jax plan` leaves it: the LM's process must not
        # read the device count from XLA_FLAGS (3 devices do not divide its batch of 64)
        patch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=3")
        return workdir, demo_run.run(workdir, steps=STEPS)


def test_demo_runs_every_stage_and_evaluates_the_whole_test_split(demo):
    workdir, results = demo
    assert {s: r["steps"] for s, r in results["stages"].items()} == STEPS
    for stage in STEPS:
        assert (workdir / stage / "checkpoints" / str(STEPS[stage])).is_dir()
    # the LM trained in the second process, which wrote its steps to its own log
    assert f"step {STEPS[demo_run.SIDE_STAGE]} |" in (workdir / demo_run.SIDE_STAGE / "train.log").read_text()
    assert results["classification"]["count"] == 880  # captioned test images
    assert results["vqa"]["count"] == 9673  # every test question
    answers = json.loads((workdir / "eval_vqa" / "results.json").read_text())
    assert len({a["question_id"] for a in answers}) == 9673
    assert (workdir / "loss_curves.png").stat().st_size > 0
    assert json.loads((workdir / "demo_results.json").read_text())["vqa"] == results["vqa"]


def test_transformers_answers_the_export_as_we_do(demo):
    _, results = demo
    assert results["hf_agreement"] == 1.0


def test_table_and_resume(demo, monkeypatch):
    workdir, results = demo
    text = demo_run.table(results)
    assert "VQA accuracy (exact match, greedy)" in text and f"{results['vqa']['accuracy']:.3f}" in text

    def no_training(*_):
        raise AssertionError("a finished stage was trained again")

    monkeypatch.setattr(demo_run.loop, "train", no_training)
    monkeypatch.setattr(demo_run, "evaluate", lambda config, out: {"accuracy": 0.0, "count": 0})  # not under test
    again = demo_run.run(workdir, steps=STEPS, hf_check=False)
    assert [r["loss"] for r in again["stages"].values()] == [r["loss"] for r in results["stages"].values()]


def test_the_instruction_demo_tunes_an_instructblip_from_the_demos_blip2(demo):
    """`demo --instruct`'s second part at a few steps: an InstructBLIP starts from stage 2's BLIP-2
    (its frozen LLM and ViT kept bit for bit) with its Q-Former's text side from stage 1, trains on
    the held-in phrasings only, and both models are scored on every phrasing."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    from flax import traverse_util  # pylint: disable=import-outside-toplevel

    from blip2_jax.demo import configs  # pylint: disable=import-outside-toplevel
    from blip2_jax.weights.model_checkpoint import CheckpointParams  # pylint: disable=import-outside-toplevel

    workdir, _ = demo
    results = demo_run.run_instruct(workdir, steps=3, limit=16)
    assert results["steps"] == 3 and results["questions"] == 16
    assert set(results["accuracy"]) == set(configs.INSTRUCTIONS) and results["held_out"] == list(configs.HELD_OUT)
    assert all(0 <= a[m] <= 1 for a in results["accuracy"].values() for m in ("stage2", "instruct"))
    config = configs.train_config("instruct", workdir)
    assert not set(config.data.vqa_templates) & set(configs.HELD_OUT)
    tuned = CheckpointParams.open(workdir / "instruct")
    assert tuned.architecture == "InstructBlipForConditionalGeneration"
    ours = traverse_util.flatten_dict(tuned.tree(), sep="/")
    blip2 = traverse_util.flatten_dict(CheckpointParams.open(workdir / "stage2").tree(), sep="/")
    frozen = [p for p in ours if p.startswith(("language_model/", "vision_model/encoder"))]
    assert frozen and all(np.array_equal(ours[p], blip2[p]) for p in frozen)
    assert "(held out)" in demo_run.instruct_table(results)

    from blip2_jax.errors import UserError  # pylint: disable=import-outside-toplevel

    config.init.stage1 = ""  # a BLIP-2 stage 2 has no text side for the instruction: refused, not left random
    with pytest.raises(UserError, match="takes it from init.stage1"):
        demo_run.loop.train(config, workdir / "instruct_without_stage1")
