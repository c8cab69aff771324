"""Captioning: COCO Karpathy test and NoCaps val (zero-shot), the paper's Table 3 setup.

  blip2-jax eval --config configs/eval/caption.py:coco_opt2.7b --out /tmp/eval \\
      --config.data.annotations=coco_karpathy_test.json --config.data.image_root=/data/coco

COCO-finetuned checkpoints at 364 px, prompt "a photo of", beam 5, max_len 30, min_len 8,
repetition and length penalty 1.0 (caption_coco_opt*.yaml), decoded with semantics "lavis_paper":
the paper-era Blip2OPT.generate (LAVIS@85907dd, transformers 4.26) that produced Table 3 counts the
prompt ids (BOS + "a photo of") in min_len and in the beam length normaliser, so OPT generates at
least 4 new tokens (at most 30); FlanT5 counts its decoder start token (at least 7). LAVIS@HEAD
decodes otherwise (`semantics="lavis"`: at most 29 new tokens for OPT, and its CaptionTask fills in
repetition 1.15 / length 0); spec §6.3. Presets: coco_<model>, nocaps_<model> for model in
opt2.7b, opt6.7b, flant5xl.
"""
import ml_collections

from blip2_jax.errors import UnknownName
from blip2_jax.evaluate.config import base_config, set_generation
from blip2_jax.generation.config import CAPTION, PROMPTS
from blip2_jax.models.presets import HUB_IDS

# Paper Table 3: COCO Karpathy test (BLEU-4, CIDEr) and NoCaps val overall (CIDEr, SPICE).
_PUBLISHED = {
    "coco_opt2.7b": dict(Bleu_4=43.7, CIDEr=145.8), "coco_opt6.7b": dict(Bleu_4=43.5, CIDEr=145.2),
    "coco_flant5xl": dict(Bleu_4=42.4, CIDEr=144.5),
    "nocaps_opt2.7b": dict(CIDEr=119.7, SPICE=15.4), "nocaps_opt6.7b": dict(CIDEr=121.0, SPICE=15.3),
    "nocaps_flant5xl": dict(CIDEr=121.6, SPICE=15.8),
}


def get_config(arg: str = "coco_opt2.7b") -> ml_collections.ConfigDict:
    if arg not in _PUBLISHED:
        raise UnknownName(f"configs/eval/caption.py presets: {sorted(_PUBLISHED)}; got {arg!r}")
    dataset, model = arg.split("_", 1)
    c = base_config("caption")
    c.checkpoint = HUB_IDS[f"{model}-coco"]
    c.prompt = PROMPTS["caption"]
    set_generation(c, CAPTION)
    c.data.annotations = "coco_karpathy_test.json" if dataset == "coco" else "nocaps_val.json"
    c.spice = dataset == "nocaps"
    c.published = ml_collections.ConfigDict(_PUBLISHED[arg])
    return c
