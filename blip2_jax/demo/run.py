"""`blip2-jax demo`: BLIP-2's premise in miniature, end to end, on a CPU with no download.

BLIP-2 bridges a frozen image encoder and a frozen language model with a Q-Former. No pretrained
towers can be downloaded here, so the demo makes its own unimodal models first and freezes them:

1. tokenizers over easy-VQA's 35 words (`demo/tokenizers.py`);
2. `lm`: a 3-layer OPT learns text alone, "a red circle. </s>question: is there a red shape answer:
   yes" (the loss on the answer), the caption before BOS where stage 2 puts the image's queries: it
   can answer from a caption, and has never seen an image;
3. the image encoder is a random 2-layer ViT (8x8 patches), never trained: a random projection of
   the patches keeps what the Q-Former needs, and it is frozen in both stages as BLIP-2's ViT is;
4. `stage1`: the Q-Former learns ITC + ITM + ITG against it on the captions "a <colour> <shape>";
5. `stage2`: the Q-Former (from stage 1) learns to prompt the frozen OPT in the caption's place:
   [visual prompt ; "question: ... answer:"] -> the answer;
6. evaluation on the test split (880 images, 9,673 questions): zero-shot classification by ITC over
   the 24 captions (stage 1) and VQA exact match (stage 2), sharded over the simulated devices
   (`blip2-jax demo` makes 2);
7. export of stage 2 to a Hugging Face directory, answered again by `transformers` (with torch).

Steps 2 and 4 do not depend on each other and train at once, the LM in a second process. Every run
resumes: a finished stage is skipped, a killed one continues from its last checkpoint.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax

from blip2_jax.data import easy_vqa
from blip2_jax.data.tokenizers import INSTRUCTION_TOKENIZER_DIR
from blip2_jax.demo import configs, tokenizers
from blip2_jax.evaluate.run import evaluate
from blip2_jax.train import loop

STAGES = ("lm", "stage1", "stage2")
# Trained in a second process while this one trains stage 1: the two do not depend on each other, and
# a tiny model's step keeps only one of two cores busy (measured: stage 1 alone 0.37 s a step, beside
# the LM 0.37 s; the LM alone 0.13 s, beside stage 1 0.16 s).
SIDE_STAGE = "lm"
HF_CHECK_QUESTIONS = 16  # test questions `transformers` answers again from the exported directory


def _finished(workdir: Path, steps: int) -> bool:
    return (workdir / "checkpoints" / str(steps)).is_dir()


def _last_metrics(workdir: Path) -> dict[str, float]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1]) if lines else {}


def plot_losses(workdir: Path, out: Path) -> Path:
    """One panel per run: its losses against the step (from each run's metrics.jsonl)."""
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    fig, axes = plt.subplots(1, len(STAGES), figsize=(4 * len(STAGES), 3.2))
    for ax, stage in zip(axes, STAGES):
        rows = [json.loads(line) for line in (workdir / stage / "metrics.jsonl").read_text().splitlines()]
        for key in sorted({k for r in rows for k in r if k.startswith("loss")}):
            ax.plot([r["step"] for r in rows if key in r], [r[key] for r in rows if key in r], label=key)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def hf_answers(hf_dir: Path, count: int) -> list[str]:
    """Greedy answers of `transformers`' Blip2ForConditionalGeneration, loaded from the export, to the
    first `count` test questions, with inputs from its own saved Blip2Processor."""
    # pylint: disable=import-outside-toplevel
    import torch
    import transformers
    from PIL import Image

    from blip2_jax.data.sources import EasyVqaSource
    from blip2_jax.data.text import pre_question

    model = transformers.Blip2ForConditionalGeneration.from_pretrained(hf_dir).eval()
    processor = transformers.Blip2Processor.from_pretrained(hf_dir)
    processor.tokenizer.padding_side = "left"  # batched generation from a decoder-only LM, as ours pads
    source = EasyVqaSource("test")
    records = [source[i] for i in range(count)]
    inputs = processor(images=[Image.open(r["image"]).convert("RGB") for r in records],
                       text=[configs.PROMPT.format(pre_question(r["question"])) for r in records],
                       return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, num_beams=1, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1]:]  # generate returns the prompt ids and the new ones
    return [t.strip() for t in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]


def _train_here(config, workdir: Path) -> float:
    """Train one stage in this process unless it is finished; its seconds."""
    tick = time.perf_counter()
    if not _finished(workdir, config.total_steps):
        print(f"== {workdir.name}: {config.total_steps} steps of batch {config.batch_size} ==", flush=True)
        loop.train(config, workdir)
    return time.perf_counter() - tick


def _train_stage(workdir: Path, stage: str, steps: int, log: Path, done, platform: str, devices: int) -> None:
    """A second process's whole job: train one stage on the parent's platform and, on CPU, as many
    simulated devices (passed, not inherited: the parent's XLA_FLAGS may have changed since its
    backend started), its output to `log`, and send its seconds."""
    if platform == "cpu":  # read when the backend starts, which is below
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    jax.config.update("jax_platforms", platform)
    with log.open("w") as out:
        os.dup2(out.fileno(), 1)  # XLA and absl write to the file descriptors, not to sys.stdout
        os.dup2(out.fileno(), 2)
        tick = time.perf_counter()
        loop.train(configs.train_config(stage, workdir, steps), workdir / stage)
        sys.stdout.flush()
        done.send(time.perf_counter() - tick)


class _SideStage:
    """One stage trained in a spawned process, on this one's platform and number of devices."""

    def __init__(self, workdir: Path, stage: str, steps: int):
        (workdir / stage).mkdir(parents=True, exist_ok=True)
        self.stage, self.log = stage, workdir / stage / "train.log"
        context = multiprocessing.get_context("spawn")  # a forked child would inherit JAX's threads
        self._receive, send = context.Pipe(duplex=False)
        self._process = context.Process(target=_train_stage, daemon=True,
                                        args=(workdir, stage, steps, self.log, send, jax.default_backend(),
                                              jax.local_device_count()))
        self._process.start()
        send.close()
        self._seconds: float | None = None
        print(f"== {stage}: {steps} steps, in a second process (log: {self.log}) ==", flush=True)

    def wait(self) -> float:
        """Its training time; raises with the end of its log if it failed."""
        if self._seconds is None:
            with contextlib.suppress(EOFError):
                self._seconds = self._receive.recv()
            self._process.join()
            if self._seconds is None or self._process.exitcode:
                tail = "\n".join(self.log.read_text().splitlines()[-15:])
                raise RuntimeError(f"the {self.stage} run (a second process) failed with exit code "
                                   f"{self._process.exitcode}; the end of {self.log}:\n{tail}")
            print(f"== {self.stage}: done in {self._seconds:.0f} s ==", flush=True)
        return self._seconds


def run(workdir: str | Path = configs.DEFAULT_WORKDIR, *, steps: dict[str, int] | None = None,
        hf_check: bool = True) -> dict[str, Any]:
    """The whole demo under `workdir`; returns (and writes to demo_results.json) its results."""
    workdir = Path(workdir)
    start = time.perf_counter()
    tokenizers.write_qformer_tokenizer(workdir / "tokenizers" / "qformer")
    tokenizers.write_language_tokenizer(workdir / "tokenizers" / "lm")
    results: dict[str, Any] = {"devices": jax.device_count()}
    plans = {stage: configs.train_config(stage, workdir, (steps or {}).get(stage)) for stage in STAGES}
    side = None
    if not _finished(workdir / SIDE_STAGE, plans[SIDE_STAGE].total_steps):
        side = _SideStage(workdir, SIDE_STAGE, plans[SIDE_STAGE].total_steps)
    seconds = {"stage1": _train_here(plans["stage1"], workdir / "stage1")}
    seconds[SIDE_STAGE] = side.wait() if side is not None else 0.0  # stage 2 starts from the LM
    seconds["stage2"] = _train_here(plans["stage2"], workdir / "stage2")
    results["stages"] = {stage: {"steps": plans[stage].total_steps, "seconds": seconds[stage],
                                 "loss": _last_metrics(workdir / stage).get("loss")} for stage in STAGES}
    for task in ("classification", "vqa"):
        print(f"== evaluating {task} on easy-VQA's test split ==", flush=True)
        results[task] = evaluate(configs.eval_config(task, workdir), workdir / f"eval_{task}")
    hf_dir = workdir / "hf_export"
    if not hf_dir.exists():
        from blip2_jax.convert.hf_export import to_hf  # pylint: disable=import-outside-toplevel

        to_hf(workdir / "stage2", hf_dir, tokenizer=str(workdir / "tokenizers" / "lm"))
    results["hf_export"] = str(hf_dir)
    if hf_check and importlib.util.find_spec("torch") is None:
        print("torch is not installed (pip install -e '.[torch]'): the export is not answered by transformers")
    elif hf_check:
        ours = [r["answer"] for r in json.loads((workdir / "eval_vqa" / "results.json").read_text())]
        theirs = hf_answers(hf_dir, HF_CHECK_QUESTIONS)
        results["hf_agreement"] = sum(a == b for a, b in zip(ours, theirs)) / len(theirs)
    results["loss_curves"] = str(plot_losses(workdir, workdir / "loss_curves.png"))
    results["tensorboard"] = [str(workdir / s / "tensorboard") for s in STAGES]
    results["seconds"] = time.perf_counter() - start
    (workdir / "demo_results.json").write_text(json.dumps(results, indent=2))
    return results


def run_instruct(workdir: str | Path = configs.DEFAULT_WORKDIR, *, steps: int | None = None,
                 limit: int = 0) -> dict[str, Any]:
    """The instruction demo, after `run` (its stage-1 and stage-2 runs under `workdir`): InstructBLIP
    tuned from the demo's BLIP-2 on test questions phrased through several of the paper's templates
    (`configs.INSTRUCTIONS`, one held out), then VQA accuracy per phrasing for the BLIP-2 of stage 2
    and for the InstructBLIP (the first `limit` test questions; 0: all). Written to
    demo_instruct_results.json."""
    workdir = Path(workdir)
    start = time.perf_counter()
    # InstructBLIP's processor layout: the Q-Former's tokenizer beside the LLM's (the evaluation reads it there)
    tokenizers.write_qformer_tokenizer(workdir / "tokenizers" / "lm" / INSTRUCTION_TOKENIZER_DIR)
    config = configs.train_config("instruct", workdir, steps)
    seconds = _train_here(config, workdir / "instruct")
    accuracy: dict[str, dict[str, float]] = {}
    for i, template in enumerate(configs.INSTRUCTIONS):
        print(f"== evaluating VQA phrased as {template!r} ==", flush=True)
        for run_name in ("stage2", "instruct"):
            c = configs.eval_config("vqa", workdir, run=run_name, prompt=template)
            c.data.limit = limit
            scores = evaluate(c, workdir / "eval_instruct" / f"{run_name}_{i}")
            accuracy.setdefault(template, {})[run_name] = scores["accuracy"]
            count = scores["count"]
    results = {"devices": jax.device_count(), "steps": config.total_steps, "train_seconds": seconds,
               "loss": _last_metrics(workdir / "instruct").get("loss"), "questions": count,
               "held_out": list(configs.HELD_OUT), "accuracy": accuracy, "seconds": time.perf_counter() - start}
    (workdir / "demo_instruct_results.json").write_text(json.dumps(results, indent=2))
    return results


def instruct_table(results: dict[str, Any]) -> str:
    """The instruction demo's accuracies, one row per phrasing."""
    rows = [f"blip2-jax demo --instruct: InstructBLIP tuned {results['steps']} steps from the demo's BLIP-2 "
            f"({results['train_seconds']:.0f} s), VQA exact match on {results['questions']} test questions", "",
            f"{'the question phrased as':<42}{'BLIP-2':>9}{'InstructBLIP':>14}"]
    for template, acc in results["accuracy"].items():
        mark = " (held out)" if template in results["held_out"] else ""
        rows.append(f"{repr(template) + mark:<42}{acc['stage2']:>9.3f}{acc['instruct']:>14.3f}")
    return "\n".join(rows)


def table(results: dict[str, Any]) -> str:
    """The results as the demo prints them, with the baselines beside each number."""
    vqa_majority = 0.37  # "yes" on every question of the test split
    rows = [f"blip2-jax demo: {results['devices']} devices, {results['seconds'] / 60:.1f} min", "",
            f"{'run':<10}{'steps':>8}{'final loss':>12}{'seconds':>10}"]
    rows += [f"{s:<10}{r['steps']:>8}{r['loss']:>12.3f}{r['seconds']:>10.0f}" for s, r in results["stages"].items()]
    cls, vqa = results["classification"], results["vqa"]
    rows += ["", f"{'easy-VQA test':<44}{'ours':>8}{'baseline':>10}",
             f"{'zero-shot classification by ITC (24 captions)':<44}{cls['accuracy']:>8.3f}"
             f"{1 / len(easy_vqa.all_captions()):>10.3f}",
             f"{'VQA accuracy (exact match, greedy)':<44}{vqa['accuracy']:>8.3f}{vqa_majority:>10.3f}", ""]
    if "hf_agreement" in results:
        rows.append(f"transformers answers from the export agree with ours on {results['hf_agreement']:.0%} of "
                    f"{HF_CHECK_QUESTIONS} test questions")
    rows += [f"Hugging Face export: {results['hf_export']}", f"loss curves: {results['loss_curves']}",
             f"TensorBoard: tensorboard --logdir {Path(results['tensorboard'][0]).parent.parent}"]
    return "\n".join(rows)
