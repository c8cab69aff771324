"""The demo's three training runs and two evaluations, as ordinary configs.

Each can also be run alone (`configs/demo.py`): the demo only chains them and points each at the
tokenizers and the runs before it, all under one work directory.
"""
from __future__ import annotations

from pathlib import Path

import ml_collections

from blip2_jax.evaluate import config as evaluate_config
from blip2_jax.models import presets
from blip2_jax.train.config import base_config, stage1_config

DEFAULT_WORKDIR = "/tmp/blip2_jax_demo"  # `blip2-jax demo --workdir`'s default
BATCH = 64
PROMPT = "question: {} answer:"  # the LM text's own words: the visual prompt takes the caption's place
STEPS = {"lm": 2000, "stage1": 1000, "stage2": 1200, "instruct": 1200}
# The instruction demo's phrasings: InstructBLIP's VQA templates (data/instructions.py) that the demo's
# vocabulary can say, lowercased as its tokenizer is. The last is held out: never trained on.
INSTRUCTIONS = ("question: {}", "{}", "question: {} short answer:", "{} a short answer to the question is",
                "q: {} a:")
HELD_OUT = INSTRUCTIONS[-1:]


def _common(c: ml_collections.ConfigDict, stage: str, workdir: Path, steps: int) -> ml_collections.ConfigDict:
    c.batch_size, c.total_steps = BATCH, steps
    # 50 warmup steps, fewer in a shortened run (`demo.run(steps=...)`)
    c.optim.update(lr=2e-3, min_lr=1e-4, warmup_lr=1e-5, warmup_steps=min(50, steps // 10), weight_decay=0.01)
    c.data.transform = "blip_image_eval"  # no random crop: a crop can cut the shape the caption names
    # read in the trainer's thread while the step runs: Grain's 16 threads spent more CPU handing the
    # demo's tiny records over than processing them (stage 1: 74 against 32 ms a batch, on 2 cores)
    c.data.read_threads = 0
    c.data.cache_images = True  # 4,000 images of 12 KB, each read 16-20 times: decoded once
    c.checkpoint.update(every=250, keep=1)
    c.log.every = 50
    c.data.tokenizer = str(workdir / "tokenizers" / ("qformer" if stage == "stage1" else "lm"))
    return c


def train_config(stage: str, workdir: str | Path, steps: int | None = None) -> ml_collections.ConfigDict:
    """'lm': the OPT learns "<caption>. | BOS question: <q> answer: <a>" from text alone, the caption
    where stage 2 puts the queries; 'stage1': the Q-Former learns the captions against the frozen
    random ViT; 'stage2': the Q-Former learns to prompt the frozen OPT in place of the caption (the
    question and answer after it)."""
    workdir = Path(workdir)
    steps = STEPS[stage] if steps is None else steps
    if stage == "lm":
        c = base_config("lm", "demo")
        c.trainable = "lm"
        # the caption before BOS, in as many tokens as stage 2 will put queries there
        c.data.update(source="easy_vqa_text", text_length=18, context_length=presets.get("demo").num_query_tokens)
    elif stage == "stage1":
        c = stage1_config("demo_itm")
        # images with the same caption are positives of each other (24 captions over 3,542 images)
        c.data.update(source="easy_vqa_captions", text_length=8, positives="class_id")
    elif stage == "stage2":
        c = base_config("stage2", "demo")
        c.data.update(source="easy_vqa", text_length=16, prompt=PROMPT)
        c.init.update(checkpoint=str(workdir / "lm"), stage1=str(workdir / "stage1"))
    elif stage == "instruct":  # InstructBLIP from the BLIP-2 of stage 2, its Q-Former text side from stage 1
        c = base_config("stage2", "demo_instruct")
        c.data.update(source="easy_vqa", text_length=24, templates="instructblip",
                      vqa_templates=tuple(t for t in INSTRUCTIONS if t not in HELD_OUT),
                      instruction_tokenizer=str(workdir / "tokenizers" / "qformer"), instruction_length=24)
        c.init.update(checkpoint=str(workdir / "stage2"), stage1=str(workdir / "stage1"))
    else:
        raise KeyError(f"demo stages: lm, stage1, stage2, instruct; got {stage!r}")
    c = _common(c, stage, workdir, steps)
    if stage == "stage2":  # the frozen LM's gradients are larger and noisier than stage 1's: at 2e-3
        c.optim.lr = 1e-3  # VQA reached 0.725, at 1e-3 0.785 (before the LM read its captions before BOS)
    if stage == "instruct":  # picked by the mean over the held-in phrasings (AVX-512 Xeon, 2026-12-07): 600 steps
        c.optim.lr = 5e-4  # at 1e-3 0.586, 1200 at 5e-4 0.623, 1200 at 2e-4 0.608
    return c



def eval_config(task: str, workdir: str | Path, *, run: str = "stage2",
                prompt: str = PROMPT) -> ml_collections.ConfigDict:
    """'classification': which of the 24 captions fits each test image, by ITC alone (stage 1);
    'vqa': greedy answers to every test question (the `run`, phrased with `prompt`), exact match."""
    workdir = Path(workdir)
    if task == "classification":
        c = evaluate_config.base_config("retrieval")
        c.k_test, c.text_length = 0, 8
        c.checkpoint, c.tokenizer = str(workdir / "stage1"), str(workdir / "tokenizers" / "qformer")
    elif task == "vqa":
        c = evaluate_config.base_config("vqa")
        c.prompt, c.metric = prompt, "exact_match"
        c.generation.update(num_beams=1, max_new_tokens=3)
        c.checkpoint, c.tokenizer = str(workdir / run), str(workdir / "tokenizers" / "lm")
    else:
        raise KeyError(f"demo evaluations: classification, vqa; got {task!r}")
    c.data.update(source="easy_vqa", split="test")
    c.batch_size = 32
    return c
