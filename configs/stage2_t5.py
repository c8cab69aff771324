"""Stage 2 with a frozen FlanT5: prefix language-modelling loss through the LLM into the Q-Former.

  blip2-jax train --config configs/stage2_t5.py:tiny --workdir /tmp/s2         # CPU, ~1 min
  blip2-jax train --config configs/stage2_t5.py:flant5xl --workdir gs://bucket/s2 \\
      --config.init.hf=Salesforce/blip2-flan-t5-xl --config.mesh.fsdp=8

Presets: `tiny`, `flant5xl`, `flant5xxl`. Paper: 80k steps, batch 1520, min LR 5e-5, 2k warmup,
AdamW b2=0.98. FlanT5 is frozen in bf16 (spec §7.1). `<preset>_int8` (e.g. `flant5xxl_int8`) keeps
the frozen LLM's and ViT's dense kernels in int8 with per-channel scales (`models/quantization.py`),
computed from `init.hf`'s weights at load: half the frozen bytes of bf16 per device.
"""
import ml_collections

from blip2_jax.models import quantization
from blip2_jax.train.config import stage2_config

_MODEL = {"tiny": "tiny_t5", "flant5xl": "flant5xl", "flant5xxl": "flant5xxl"}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    c = stage2_config(arg.removesuffix("_int8"), _MODEL, paper_batch=1520)
    if arg.endswith("_int8"):
        c.model.int8 = quantization.TOWERS
    return c
