"""The fields every training config has; `configs/stage*.py` fill them per preset.

Like big_vision's `configs/common.py`: config files are data, this is the shared skeleton so
every field exists (and can be overridden with `--config.x=y`) in every preset.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from blip2_jax.errors import UnknownName
from blip2_jax.models import presets
from blip2_jax.parallel import mesh as mesh_lib
from blip2_jax.train import optim


def base_config(stage: str, model_preset: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # 'stage1' (Blip2Stage1: ITC+ITM+ITG), 'stage2' (LM loss through a frozen LLM) or 'lm' (text-only
    # pretraining of the LLM, the demo's; objectives/lm.py)
    c.stage = stage
    c.model_preset = model_preset
    c.model = presets.to_config_dict(presets.get(model_preset))
    c.trainable = stage  # partition preset (train/partition.py) or a list of path regexes
    c.frozen_dtype = "float32"  # storage of the frozen ViT/LLM; 'bfloat16' halves their memory
    c.seed = 0
    c.batch_size = 8  # global batch
    c.total_steps = 10
    # data=-1 takes the devices fsdp*tensor leave; num_devices=-1 uses every device (all hosts). rules: each
    # parameter logical axis -> mesh axes ("fsdp", "fsdp,tensor", "" replicated; parallel/mesh.py). A parameter
    # a rule shards along a dimension the mesh does not divide is replicated instead and reported; the run is
    # refused when that costs one parameter more than max_replicated_mib per device.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, num_devices=-1,
                                            rules=dict(mesh_lib.DEFAULT_RULES), max_replicated_mib=64.0))
    c.optim = optim.default_config()
    c.optim.schedule = "cosine"
    c.optim.total_steps = c.get_ref("total_steps")
    c.loss = ml_collections.ConfigDict()
    # source: synthetic | json (annotations: comma-separated LAVIS files, image_root) | arrayrecord (path:
    # shard prefix) | tfds (tfds_name, split, path: data_dir) | webdataset (path: tar shards, comma-separated,
    # brace patterns: /data/laion/{00000..01023}.tar, gs:// too) | parquet (path: files as webdataset's;
    # columns: "image=COL,caption=COL,id=COL" where they are not named so; a path column is under
    # image_root) | easy_vqa | easy_vqa_captions | easy_vqa_text
    # (split; the last two are the demo's captions and LM text, data/easy_vqa.py). tokenizer: the Q-Former's
    # BERT (stage 1) or the LLM's (stage 2), a directory or hub id. Bad records are skipped and counted
    # (data_skipped in the metrics) unless strict. mixture: a list of dicts of the source fields above plus
    # `weight` (e.g. [dict(source="json", annotations="coco.json", weight=2), dict(source="arrayrecord",
    # path="vg", weight=1)]), empty for the one source above. prefix_lm: FlanT5's random caption split.
    # positives: stage 1's record field whose equal values are positive pairs (LAVIS retrieval: image_id).
    # context_length: the text-only LM's tokens before BOS, where stage 2 puts the image queries (the
    # demo's captions, data/easy_vqa.py); 0 for none. instruction_length: InstructBLIP's instruction
    # tokens for its Q-Former (stage 2 of an instruction-aware model: configs/instruct.py), in the
    # vocabulary of instruction_tokenizer (the Q-Former's BERT tokenizer; the LLM's is `tokenizer`).
    # mixture_balance: a mixture without weights draws in proportion to each source's size ('size',
    # LAVIS) or to its square root ('sqrt', InstructBLIP's balancing); an entry's `scale` multiplies
    # that, its `task` ('vqg') tags its records. templates: "instructblip" gives each record one of the
    # paper's instruction templates for its task (data/instructions.py) instead of `prompt`;
    # vqa_templates, if given, replace the paper's VQA ones ("{}" is the question). workers: processes
    # that read and process records; read_threads: Grain threads of this process that read ahead
    # (0: records are read in the trainer's own thread, while the step runs; for small records on few
    # cores this is cheaper: the demo's stage-1 batch costs 32 ms of CPU against 74 with 16 threads).
    # cache_images: decode each image once and keep it in memory (uint8), for sets small enough.
    c.data = ml_collections.ConfigDict(dict(
        source="synthetic", text_length=32, annotations="", image_root="", path="", tfds_name="", split="train",
        tokenizer="", prompt="", transform="blip2_image_train", workers=0, read_threads=16, cache_images=False,
        strict=False, prefix_lm=False, positives="", context_length=0, instruction_length=32, instruction_tokenizer="",
        mixture=(), mixture_balance="size", templates="", vqa_templates=(), columns=""))
    # hf: a HF BLIP-2 checkpoint; checkpoint: a model checkpoint (`blip2-jax convert from-hf/from-lavis`)
    # or a training workdir with this run's model; bert: stage 1's Q-Former from BERT; stage1: a stage-1
    # workdir or model checkpoint whose Q-Former query path and ln_vision start stage 2
    # (weights/stage1_to_stage2.py)
    c.init = ml_collections.ConfigDict(dict(hf="", checkpoint="", bert="", stage1=""))
    c.checkpoint = ml_collections.ConfigDict(dict(every=1000, keep=3, async_save=True))
    # a step with a non-finite loss or gradient norm is skipped (train/step.py); this many in a row stop the run
    c.nonfinite = ml_collections.ConfigDict(dict(max_consecutive=10))
    # progress: a bar (step, images/s, time left) on process 0's terminal; wandb: also log to Weights &
    # Biases (pip install wandb; WANDB_MODE=offline keeps it on disk) in project wandb_project;
    # profile_steps: "A,B" writes a jax.profiler trace of steps A..B to <workdir>/profile (train/profiling.py)
    c.log = ml_collections.ConfigDict(dict(every=50, tensorboard=True, progress=True, wandb=False,
                                           wandb_project="blip2_jax", profile_steps="",
                                           peak_flops_per_device=config_dict.placeholder(float)))
    c.distributed = ml_collections.ConfigDict(dict(coordinator_address="", num_processes=0, process_id=-1))
    return c


def stage1_config(model_preset: str) -> ml_collections.ConfigDict:
    """Stage 1 of `model_preset` with LAVIS's loss settings (objectives/stage1.py)."""
    c = base_config("stage1", model_preset)
    c.loss = ml_collections.ConfigDict(dict(
        itc_label_smoothing=0.1, itg_label_smoothing=0.1, hard_negative_weights="head",
        temp_clamp=config_dict.placeholder(tuple),
        bos_token_id=c.model.qformer.vocab_size - 1,  # [DEC], the token added after BERT's vocabulary
        pad_token_id=0, itc_weight=1.0, itm_weight=1.0, itg_weight=1.0))
    return c


def make_tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The CPU-sized run every config offers as `tiny`: 20 steps of batch 8, logged every step."""
    c.batch_size, c.total_steps = 8, 20
    c.optim.update(lr=1e-3, min_lr=1e-4, warmup_lr=1e-5, warmup_steps=5)
    c.data.text_length = 12
    c.checkpoint.every, c.log.every = 5, 1
    return c


def stage2_config(arg: str, models: dict[str, str], paper_batch: int) -> ml_collections.ConfigDict:
    """Stage 2 for the LLM presets `models` (config preset -> model preset): the paper's recipe
    (80k steps, min LR 5e-5, 2k warmup, AdamW b2=0.98, frozen towers in bf16) or `tiny`."""
    if arg not in models:
        raise UnknownName(f"stage-2 presets: {sorted(models)}; got {arg!r}")
    c = base_config("stage2", models[arg])
    if arg == "tiny":
        return make_tiny(c)
    c.batch_size, c.total_steps = paper_batch, 80_000
    c.optim.update(lr=1e-4, min_lr=5e-5, warmup_lr=0.0, warmup_steps=2000, b2=0.98)
    c.frozen_dtype = "bfloat16"
    c.mesh.fsdp = 8
    return c
