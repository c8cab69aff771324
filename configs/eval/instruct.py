"""InstructBLIP zero-shot on held-out sets (Dai et al. 2023, Table 1): NoCaps and Flickr30K
captioning, GQA, VizWiz and TextVQA question answering, ScienceQA-image multiple choice, for the
four published checkpoints.

  blip2-jax eval --config configs/eval/instruct.py:gqa_vicuna7b --out /tmp/eval \\
      --config.data.annotations=gqa_testdev_balanced.json --config.data.image_root=/data/gqa/images

The instruction reaches the Q-Former and the LLM alike (the Q-Former tokenizer comes from the
checkpoint's processor directory, `qformer_tokenizer/`). Settings are LAVIS's InstructBLIP eval
configs (lavis/projects/instructblip/*.yaml), decoded as its `generate` calls the LLM (`inputs_embeds`
with max/min length: semantics "lavis"; spec §6.3): captions "A short image caption." at 224 px,
beam 5, max_len 80, min_len 10, length penalty 1; questions "Question: {} Short Answer:", beam 5,
max_len 10, min_len 1, length penalty -1; TextVQA's prompt also holds each question's first 30 OCR
tokens (its records' `ocr_tokens`), joined by ", " before the question as LAVIS's predict_answers fills
a two-slot prompt; that prompt's wording is a public BLIP evaluation script's, not LAVIS's. Metrics:
CIDEr; exact match (GQA); VQA accuracy over the ten answers (VizWiz, TextVQA; the official
answer normalisation). The annotation files are LAVIS's JSON layout (image, question, answer list).
ScienceQA-image (task "choice"): each candidate answer ranked by its summed negative log-likelihood
after the image and the prompt, as the paper's "vocabulary ranking" and LAVIS's predict_class score
it; the prompt holds the question and the choices "(a) ... (b) ...", after "context: <hint>. " where
a question has one (LAVIS's composition; the template's wording is ours). Records: LAVIS's layout
with `choices` (texts), `answer` (the right one's index) and an optional `context`.
The paper's exact per-set instructions and splits are in its appendix, which we could not read
here: compare the published figure with that in mind.
Presets: <nocaps|flickr|gqa|vizwiz|textvqa|scienceqa>_<vicuna7b|vicuna13b|flant5xl|flant5xxl>.
"""
import dataclasses

import ml_collections

from blip2_jax.errors import UnknownName
from blip2_jax.evaluate.config import base_config, set_generation
from blip2_jax.generation.config import GenerationConfig
from blip2_jax.models.presets import HUB_IDS

# Table 1 of the paper, per model: NoCaps, Flickr30K (CIDEr); GQA, VizWiz, TextVQA, ScienceQA-image (%).
_TABLE_1 = {"flant5xl": (119.9, 84.5, 48.4, 32.7, 46.6, 70.4), "flant5xxl": (120.0, 83.5, 47.9, 30.9, 46.6, 70.6),
            "vicuna7b": (123.1, 82.4, 49.2, 34.5, 50.1, 60.5), "vicuna13b": (121.9, 82.8, 49.5, 33.4, 50.7, 63.1)}
_DATASETS = {  # task, annotations (LAVIS's names where it ships the set), VQA metric
    "nocaps": ("caption", "nocaps_val.json", None), "flickr": ("caption", "flickr30k_test.json", None),
    "gqa": ("vqa", "gqa_testdev_balanced.json", "exact_match"), "vizwiz": ("vqa", "vizwiz_val.json", "vqa"),
    "textvqa": ("vqa", "textvqa_val.json", "vqa"), "scienceqa": ("choice", "scienceqa_test_img.json", None)}
CAPTION = GenerationConfig(semantics="lavis", num_beams=5, max_new_tokens=80, min_length=10, length_penalty=1.0)
VQA = dataclasses.replace(CAPTION, max_new_tokens=10, min_length=1, length_penalty=-1.0)
PROMPTS = {"caption": "A short image caption.", "vqa": "Question: {} Short Answer:",
           "textvqa": "OCR tokens: {}. Question: {} Short answer:", "choice": "Question: {} Options: {}. Answer:"}


def get_config(arg: str = "gqa_vicuna7b") -> ml_collections.ConfigDict:
    dataset, _, model = arg.partition("_")
    if dataset not in _DATASETS or model not in _TABLE_1:
        raise UnknownName(f"configs/eval/instruct.py presets: <{'|'.join(_DATASETS)}>_<{'|'.join(_TABLE_1)}>; "
                          f"got {arg!r}")
    task, annotations, metric = _DATASETS[dataset]
    c = base_config(task)
    c.checkpoint = HUB_IDS[f"instruct_{model}"]
    c.prompt = PROMPTS["textvqa" if dataset == "textvqa" else task]
    set_generation(c, CAPTION if task == "caption" else VQA)  # (ranking generates nothing)
    c.data.annotations = annotations
    c.metric = metric or c.metric
    figure = _TABLE_1[model][list(_DATASETS).index(dataset)]
    c.published = ml_collections.ConfigDict({"CIDEr": figure} if task == "caption" else {"accuracy": figure / 100})
    return c
