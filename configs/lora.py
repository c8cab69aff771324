"""LoRA fine-tuning (`models/lora.py`): adapters on the frozen LLM's attention, trained with the
Q-Former's query path and projection, everything else frozen.

  blip2-jax train --config configs/lora.py:tiny --workdir /tmp/lora                      # CPU, synthetic
  blip2-jax train --config configs/lora.py:caption_coco_opt2.7b --workdir gs://bucket/lora \\
      --config.data.annotations=coco_karpathy_train.json --config.data.image_root=/data/coco
  blip2-jax convert to-hf --src gs://bucket/lora --out /tmp/hf   # base model + /tmp/hf/adapter (PEFT)

Presets:
- tiny: the tiny stage-2 OPT with rank-4 adapters on its LLM's q_proj/v_proj and its ViT's qkv, 20
  steps of synthetic batches.
- caption_coco_<m> for m in opt2.7b, opt6.7b, flant5xl: the published stage-2 model (224 px, its
  LLM and ViT frozen in bf16) with rank-16, alpha-32 adapters (dropout 0.05) on every attention
  projection of the LLM (OPT q/k/v/out_proj, T5 q/k/v/o), and the stage-2 trainables (Q-Former,
  queries, projection, ln_vision); the caption fine-tuning recipe of `configs/finetune.py` otherwise
  (prompt "a photo of", 5 epochs of COCO Karpathy train), at the LR LoRA recipes use (1e-4).

Override what the adapters cover with `--config.model.lora.targets='("language_model/.*/(q_proj|v_proj)$",)'`
(regexes over dense-layer paths), their size with `--config.model.lora.rank=8 --config.model.lora.alpha=16`.
"""
import math

import ml_collections

from blip2_jax.errors import UnknownName
from blip2_jax.generation.config import PROMPTS
from blip2_jax.models.presets import HUB_IDS
from blip2_jax.train.config import base_config, make_tiny

_LLMS = ("opt2.7b", "opt6.7b", "flant5xl")
_MODEL = {"tiny": "tiny", **{f"caption_coco_{m}": m for m in _LLMS}}  # config preset -> model preset
_ATTENTION = {"opt": r"language_model/.*/self_attn/(q_proj|k_proj|v_proj|out_proj)$",
              "t5": r"language_model/.*/(SelfAttention|EncDecAttention)/(q|k|v|o)$"}
COCO_CAPTIONS = 566_747  # LAVIS coco_karpathy_train.json
EPOCHS = 5


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    if arg == "tiny":
        c = make_tiny(base_config("stage2", "tiny"))
        c.model.lora.update(rank=4, alpha=8.0, dropout=0.1,
                            targets=(r"language_model/.*/(q_proj|v_proj)$", r"vision_model/.*/qkv$"))
        return c
    if arg not in _MODEL:
        raise UnknownName(f"configs/lora.py presets: {', '.join(_MODEL)}; got {arg!r}")
    model = _MODEL[arg]
    c = base_config("stage2", model)
    c.init.hf = HUB_IDS[model]
    c.model.lora.update(rank=16, alpha=32.0, dropout=0.05, targets=(_ATTENTION[c.model.text_type],))
    c.frozen_dtype = "bfloat16"
    c.data.update(source="json", annotations="coco_karpathy_train.json", tokenizer=HUB_IDS[model],
                  prompt=PROMPTS["caption"], transform="blip2_image_train")
    c.batch_size = 256
    c.total_steps = EPOCHS * math.ceil(COCO_CAPTIONS / c.batch_size)
    c.optim.update(lr=1e-4, min_lr=0.0, warmup_lr=1e-8, warmup_steps=1000, weight_decay=0.05)
    c.mesh.fsdp = 8
    return c
