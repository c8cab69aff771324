"""Stage 2 with a frozen OPT: language-modelling loss through the LLM into the Q-Former.

  blip2-jax train --config configs/stage2_opt.py:tiny --workdir /tmp/s2         # CPU, ~1 min
  blip2-jax train --config configs/stage2_opt.py:opt2.7b --workdir gs://bucket/s2 \\
      --config.init.hf=Salesforce/blip2-opt-2.7b --config.mesh.fsdp=8

Presets: `tiny`, `opt2.7b`, `opt6.7b`. Paper: 80k steps, batch 1920, min LR 5e-5, 2k warmup,
AdamW b2=0.98. LAVIS (pretrain_stage2.yaml): batch 1024, warmup 2000 from 1e-6, min 1e-5, b2=0.999.
"""
import ml_collections

from blip2_jax.train.config import stage2_config

_MODEL = {"tiny": "tiny", "opt2.7b": "opt2.7b", "opt6.7b": "opt6.7b"}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    return stage2_config(arg, _MODEL, paper_batch=1920)
