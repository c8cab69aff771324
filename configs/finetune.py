"""Fine-tuning: COCO captioning, VQA and COCO retrieval, the paper's Appendix Tables 7-9 (spec §9.1).

  blip2-jax train --config configs/finetune.py:caption_coco_opt2.7b --workdir gs://bucket/ft \\
      --config.data.annotations=coco_karpathy_train.json --config.data.image_root=/data/coco

The ViT trains with the Q-Former (partition presets `finetune_stage1`/`finetune_stage2`: all but
the LLM, which stays frozen in bf16), at the fine-tuning image size: the 224 px checkpoints named by
`init.hf` are loaded with their position table interpolated to 364 or 490 px. AdamW with wd 0.05,
1000 warmup steps, cosine to 0 (LAVIS's min_lr), 5 epochs, activation checkpointing of every layer
(LAVIS checkpoints the ViT; `--config.model.remat_policy=none` turns it off).

Presets:
- caption_coco_<m> for m in opt2.7b, opt6.7b, flant5xl: 364 px, batch 256, LR 1e-5, betas (0.9,
  0.999), prompt "a photo of"; 5 epochs of COCO Karpathy train (566,747 captions).
- vqa_<m> for the same models: 490 px, batch 128, LR 1e-5, prompt "Question: {} Answer:" (FlanT5:
  "Question: {} Short answer:"); 5 epochs of VQAv2 train+val (658,111 questions). The paper adds
  Visual Genome's QA (a `data.mixture`; set total_steps to match) and also feeds the question to
  the Q-Former, which LAVIS's BLIP-2 code does not have (spec §17), nor does this one.
- retrieval_coco_vit_g, retrieval_coco_vit_l: stage-1 objectives (ITC+ITM+ITG, captions of one
  image are positives of each other), 364 px, batch 224; ViT-g LR 1e-5 betas (0.9, 0.999), ViT-L
  LR 5e-6 betas (0.9, 0.98); 5 epochs of COCO Karpathy train. ViT-L has no Hugging Face port: set
  `init.checkpoint` to a 364 px model checkpoint from `blip2-jax convert from-lavis`.

The ViT's layer-wise LR decay is the paper's (1 = off, 0.95, 0.9 per table); LAVIS stores it in
its parameter groups but its schedulers overwrite every group's LR, so its released runs train
without it (spec §9.3): `--config.optim.layer_decay=None` for LAVIS's behaviour.
"""
import math

import ml_collections

from blip2_jax.errors import UnknownName
from blip2_jax.generation.config import PROMPTS
from blip2_jax.models.presets import HUB_IDS
from blip2_jax.train.config import base_config, stage1_config

EPOCHS = 5
COCO_CAPTIONS = 566_747  # LAVIS coco_karpathy_train.json
VQAV2_TRAIN_VAL = 658_111  # 443,757 train + 214,354 val questions
_LLMS = ("opt2.7b", "opt6.7b", "flant5xl")
# preset -> (model preset, image size, batch, LR, beta2, ViT layer decay, samples per epoch)
_CAPTION_DECAY = {"opt2.7b": 1.0, "opt6.7b": 0.95, "flant5xl": 1.0}
_VQA_DECAY = {"opt2.7b": 0.95, "opt6.7b": 0.9, "flant5xl": 0.95}
_RUNS = {
    **{f"caption_coco_{m}": (m, 364, 256, 1e-5, 0.999, _CAPTION_DECAY[m], COCO_CAPTIONS) for m in _LLMS},
    **{f"vqa_{m}": (m, 490, 128, 1e-5, 0.999, _VQA_DECAY[m], VQAV2_TRAIN_VAL) for m in _LLMS},
    "retrieval_coco_vit_g": ("itm_vit_g", 364, 224, 1e-5, 0.999, 0.95, COCO_CAPTIONS),
    "retrieval_coco_vit_l": ("itm_vit_l", 364, 224, 5e-6, 0.98, 1.0, COCO_CAPTIONS),
}


def get_config(arg: str = "caption_coco_opt2.7b") -> ml_collections.ConfigDict:
    if arg not in _RUNS:
        raise UnknownName(f"configs/finetune.py presets: {sorted(_RUNS)}; got {arg!r}")
    model, image_size, batch, lr, beta2, decay, samples = _RUNS[arg]
    task = arg.split("_", 1)[0]
    if task == "retrieval":
        c = stage1_config(model)
        c.trainable = "finetune_stage1"
        c.data.update(tokenizer="bert-base-uncased", positives="image_id")
        annotations = "coco_karpathy_train.json"
    else:
        c = base_config("stage2", model)
        c.trainable = "finetune_stage2"
        c.data.tokenizer = HUB_IDS[model]  # the hub repository holds the LLM's tokenizer
        vqa_prompt = PROMPTS["vqa_t5" if model.startswith("flant5") else "vqa_opt"]
        c.data.prompt = PROMPTS["caption"] if task == "caption" else vqa_prompt
        annotations = "coco_karpathy_train.json" if task == "caption" else "vqa_train.json,vqa_val.json"
    c.init.hf = HUB_IDS.get(model, "")  # 224 px; interpolated to image_size on load
    c.model.vision.image_size = image_size
    c.model.remat_policy = "full"
    c.frozen_dtype = "bfloat16"
    c.data.update(source="json", annotations=annotations, transform="blip2_image_train")
    c.batch_size = batch
    c.total_steps = EPOCHS * math.ceil(samples / batch)
    c.optim.update(lr=lr, min_lr=0.0, warmup_lr=1e-8, warmup_steps=1000, b2=beta2, weight_decay=0.05)
    if decay != 1.0:
        c.optim.layer_decay = decay
    c.mesh.fsdp = 8
    return c
