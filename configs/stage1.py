"""Stage 1: Q-Former representation learning against a frozen ViT (ITC + ITM + ITG).

  blip2-jax train --config configs/stage1.py:tiny --workdir /tmp/s1          # CPU, ~1 min
  blip2-jax train --config configs/stage1.py:vit_g --workdir gs://bucket/s1 \\
      --config.init.bert=bert-base-uncased --config.mesh.fsdp=8

Presets: `tiny` (test model, synthetic data), `vit_l`, `vit_g` (paper scale).
Paper (§3.4, Table 7-9): 250k steps, batch 2320 (ViT-L) / 1680 (ViT-g), AdamW b2=0.98, wd 0.05,
per-step cosine from 1e-4 with 2k warmup steps. LAVIS's released recipe (pretrain_stage1.yaml)
differs: b2=0.999, warmup 5000 from 1e-6, min LR 1e-5, epoch-wise cosine over 10 epochs of
COCO+VG with batch 1600 -- select it with --config.optim.schedule=lavis_epoch plus its fields.
"""
import ml_collections

from blip2_jax.errors import UnknownName
from blip2_jax.train.config import make_tiny, stage1_config

_MODEL = {"tiny": "tiny_itm", "vit_l": "itm_vit_l", "vit_g": "itm_vit_g"}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    if arg not in _MODEL:
        raise UnknownName(f"configs/stage1.py presets: {sorted(_MODEL)}; got {arg!r}")
    c = stage1_config(_MODEL[arg])
    if arg == "tiny":
        return make_tiny(c)
    c.batch_size = 2320 if arg == "vit_l" else 1680  # paper
    c.total_steps = 250_000
    c.optim.update(lr=1e-4, min_lr=0.0, warmup_lr=0.0, warmup_steps=2000, b2=0.98)  # paper
    c.frozen_dtype = "bfloat16"  # the paper keeps the frozen ViT in fp16/bf16
    c.mesh.fsdp = 8
    return c
