"""Image-text retrieval: COCO 5K test (fine-tuned) and Flickr30K 1K test (zero-shot transfer of the
COCO-finetuned model), the paper's Table 5 setup; and easy-VQA zero-shot classification.

  blip2-jax eval --config configs/eval/retrieval.py:coco --out /tmp/eval \\
      --config.data.annotations=coco_karpathy_test.json --config.data.image_root=/data/coco

ITC over all images x texts, each query's top 128 re-ranked by ITM + ITC (spec §8), 364 px
(`Salesforce/blip2-itm-vit-g-coco`). Metrics: R@1/5/10 both ways, as LAVIS reports them (%).
"""
import ml_collections

from blip2_jax.demo.configs import DEFAULT_WORKDIR, eval_config
from blip2_jax.errors import UnknownName
from blip2_jax.evaluate.config import base_config
from blip2_jax.models.presets import HUB_IDS

# Paper Table 5, BLIP-2 ViT-g: text retrieval (image -> text) and image retrieval R@1/5/10.
_PUBLISHED = {"coco": dict(txt_r1=85.4, txt_r5=97.0, txt_r10=98.5, img_r1=68.3, img_r5=87.7, img_r10=92.6),
              "flickr": dict(txt_r1=97.6, txt_r5=100.0, txt_r10=100.0, img_r1=89.7, img_r5=98.1, img_r10=98.9)}
_ANNOTATIONS = {"coco": "coco_karpathy_test.json", "flickr": "flickr30k_test.json"}


def get_config(arg: str = "coco") -> ml_collections.ConfigDict:
    if arg == "easy_vqa":  # which of the 24 captions ("a <colour> <shape>") fits each test image, by ITC
        return eval_config("classification", DEFAULT_WORKDIR)
    c = base_config("retrieval")
    if arg not in _PUBLISHED:
        raise UnknownName(f"configs/eval/retrieval.py presets: easy_vqa, {', '.join(_PUBLISHED)}; got {arg!r}")
    c.checkpoint = HUB_IDS["itm_vit_g-coco"]
    c.data.annotations = _ANNOTATIONS[arg]
    c.published = ml_collections.ConfigDict(_PUBLISHED[arg])
    return c
