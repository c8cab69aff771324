"""The fields every evaluation config has; `configs/eval/*.py` fill them per preset."""
from __future__ import annotations

import dataclasses

import ml_collections

from blip2_jax.generation.config import GenerationConfig


def base_config(task: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = task  # caption | vqa | choice (multiple choice by ranking) | retrieval
    # a HF directory or hub id, a model checkpoint (`blip2-jax convert`) or a training workdir (`step`: -1 = latest)
    c.checkpoint, c.step = "", -1
    c.tokenizer = ""  # default: the checkpoint's (the LLM's for caption/vqa, the Q-Former's BERT for retrieval)
    c.dtype = ""  # e.g. bfloat16: storage and compute dtype; default the checkpoint's config
    c.int8 = False  # the frozen LLM's and ViT's dense kernels in int8, quantized at load (models/quantization.py)
    c.num_devices, c.fsdp = -1, 1  # every device; the rest of the mesh is data-parallel
    c.batch_size = 8  # per device
    # source: json (LAVIS eval annotations: comma-separated files, image_root) | easy_vqa (split)
    # limit: only the set's first N samples (0: all), for a quick look
    c.data = ml_collections.ConfigDict(dict(source="json", annotations="", image_root="", split="test", limit=0))
    c.prompt = ""
    c.generation = ml_collections.ConfigDict(dataclasses.asdict(GenerationConfig()))
    c.metric = "vqa"  # vqa (VQAv2 accuracy, 10 answers) | exact_match (GQA)
    c.spice = False  # SPICE needs its Java models (pycocoevalcap downloads Stanford CoreNLP on first use)
    c.k_test = 128  # retrieval: ITM re-rank of each query's top k (0: ITC only)
    c.text_length = 35  # retrieval: Q-Former text tokens (LAVIS compute_sim_matrix pads to 35)
    c.published = ml_collections.ConfigDict()  # the paper's numbers for this setup (spec §15)
    return c


def set_generation(c: ml_collections.ConfigDict, generation: GenerationConfig) -> None:
    c.generation = ml_collections.ConfigDict(dataclasses.asdict(generation))
