"""InstructBLIP instruction tuning: the Q-Former (reading each instruction beside its queries) and
the projection train from a BLIP-2 stage-2 checkpoint, the ViT and the LLM frozen.

  blip2-jax train --config configs/instruct.py:tiny --workdir /tmp/instruct            # CPU, synthetic
  blip2-jax plan --config configs/instruct.py:vicuna13b --mesh fsdp=8 --device_kind h100

Presets: `tiny` and the published models' `vicuna7b`, `vicuna13b`, `flant5xl`, `flant5xxl`. The
paper (Dai et al. 2023, §3.4): AdamW b1 0.9, b2 0.999, weight decay 0.05; the learning rate warms
up linearly from 1e-8 to 1e-5 over 1,000 steps, then cosine decay to 0; at most 60K steps; batch
192, 128 and 64 for the 3/4B, 7B and 11/13B models; the instruction reaches the Q-Former truncated
to 128 tokens (LAVIS `max_txt_len`). LAVIS releases no InstructBLIP training config to compare
(its instructblip/train/pretrain.yaml trains a BLIP VQA model, a debug setup).

Data (paper §2.2-2.4, data/instructions.py): each record's instruction is one of the paper's
templates for its task, drawn per record (`data.templates="instructblip"`: 13 for captions, 10 for
VQA, 6 for question generation, a mixture entry's `task="vqg"`); the sets of a `data.mixture` are
drawn in proportion to the square root of their sizes, times an entry's `scale` for the paper's
manual adjustments (it lowers A-OKVQA's share and raises OK-VQA's without giving the factors, so
none is set here). A record becomes an instruction-tuning row as LAVIS builds it: the LLM text is BOS +
instruction + answer + EOS, the instruction no target, and the instruction also reaches the
Q-Former through `data.instruction_tokenizer` (its BERT tokenizer). Here OK-VQA's share is raised
by 1.5 over VQAv2's (an example, not the paper's factor); `{"annotations": "...", "task": "vqg"}` adds
a set as question generation:

  blip2-jax train --config configs/instruct.py:vicuna7b --workdir gs://bucket/ib \
      --config.data.source=json --config.data.image_root=/data/coco \
      --config.data.mixture='({"annotations": "okvqa_train.json", "scale": 1.5}, {"annotations": "vqa_train.json"})' \
      --config.data.tokenizer=lmsys/vicuna-7b-v1.1 --config.data.instruction_tokenizer=bert-base-uncased
"""
import ml_collections

from blip2_jax.errors import UnknownName
from blip2_jax.train.config import base_config, make_tiny

_MODEL = {"tiny": "tiny_instruct", "vicuna7b": "instruct_vicuna7b", "vicuna13b": "instruct_vicuna13b",
          "flant5xl": "instruct_flant5xl", "flant5xxl": "instruct_flant5xxl"}
_PAPER_BATCH = {"vicuna7b": 128, "vicuna13b": 64, "flant5xl": 192, "flant5xxl": 64}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    if arg not in _MODEL:
        raise UnknownName(f"instruction-tuning presets: {sorted(_MODEL)}; got {arg!r}")
    c = base_config("stage2", _MODEL[arg])  # stage 2 of an instruction-aware model
    if arg == "tiny":
        c = make_tiny(c)
        c.data.instruction_length = 8
        return c
    c.batch_size, c.total_steps = _PAPER_BATCH[arg], 60_000
    c.optim.update(lr=1e-5, min_lr=0.0, warmup_lr=1e-8, warmup_steps=1000, b1=0.9, b2=0.999, weight_decay=0.05)
    c.data.update(instruction_length=128, mixture_balance="sqrt", templates="instructblip")  # paper §2.2, §2.4
    c.frozen_dtype = "bfloat16"
    c.mesh.fsdp = 8
    return c
