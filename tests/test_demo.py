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
