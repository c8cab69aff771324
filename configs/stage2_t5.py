"""Stage 2 with a frozen FlanT5: prefix language-modelling loss through the LLM into the Q-Former.

  blip2-jax train --config configs/stage2_t5.py:tiny --workdir /tmp/s2         # CPU, ~1 min
  blip2-jax train --config configs/stage2_t5.py:flant5xl --workdir gs://bucket/s2 \\
      --config.init.hf=Salesforce/blip2-flan-t5-xl --config.mesh.fsdp=8

Presets: `tiny`, `flant5xl`, `flant5xxl`. Paper: 80k steps, batch 1520, min LR 5e-5, 2k warmup,
AdamW b2=0.98. FlanT5 is frozen in bf16 (spec §7.1).
"""
import ml_collections

from blip2_jax.train.config import base_config

_MODEL = {"tiny": "tiny_t5", "flant5xl": "flant5xl", "flant5xxl": "flant5xxl"}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    if arg not in _MODEL:
        raise KeyError(f"configs/stage2_t5.py presets: {sorted(_MODEL)}; got {arg!r}")
    c = base_config("stage2", _MODEL[arg])
    if arg == "tiny":
        c.batch_size, c.total_steps = 8, 20
        c.optim.update(lr=1e-3, min_lr=1e-4, warmup_lr=1e-5, warmup_steps=5)
        c.data.text_length = 12
        c.checkpoint.every, c.log.every = 5, 1
        return c
    c.batch_size, c.total_steps = 1520, 80_000  # paper
    c.optim.update(lr=1e-4, min_lr=5e-5, warmup_lr=0.0, warmup_steps=2000, b2=0.98)
    c.frozen_dtype = "bfloat16"
    c.mesh.fsdp = 8
    return c
