"""Zero-shot VQA: VQAv2 val, OK-VQA test, GQA test-dev; the paper's Table 2 setup; and easy-VQA.

  blip2-jax eval --config configs/eval/vqa.py:vqav2_flant5xl --out /tmp/eval \\
      --config.data.annotations=vqa_val_eval.json --config.data.image_root=/data/coco

Pretrained (not COCO-finetuned) checkpoints at 224 px; beam 5, max_len 10, min_len 1 (no minimum:
LAVIS counts a start token in it, so an empty answer is allowed), length penalty -1 (paper §4.1);
prompts "Question: {} Answer:" (OPT) and "Question: {} Short answer:" (FlanT5). Decoding modes:
FlanT5 "lavis_paper" (the paper-era Blip2T5.predict_answers, LAVIS@85907dd); OPT "lavis" (the
paper-era OPT had no VQA code; LAVIS@HEAD's Blip2OPT.predict_answers, transformers 4.33, is the public
one). LAVIS's vqav2_zeroshot_opt_eval.yaml differs (FlanT5's prompt, length penalty 0; spec §6.4).
Metrics: VQAv2 accuracy with the official answer normalisation (VQAv2, OK-VQA); exact match (GQA).
Presets: <vqav2|okvqa|gqa>_<opt2.7b|opt6.7b|flant5xl|flant5xxl>, and easy_vqa (the demo's test split;
checkpoint and tokenizer under the demo's default work directory).
"""
import ml_collections

from blip2_jax.demo.configs import DEFAULT_WORKDIR, eval_config
from blip2_jax.errors import UnknownName
from blip2_jax.evaluate.config import base_config, set_generation
from blip2_jax.generation.config import PROMPTS, VQA_OPT, VQA_T5
from blip2_jax.models.presets import HUB_IDS

# Paper Table 2 (ViT-g rows): VQAv2 val, OK-VQA test, GQA test-dev accuracy (%).
_TABLE_2 = {"opt2.7b": (53.5, 31.7, 34.6), "opt6.7b": (54.3, 36.4, 36.4), "flant5xl": (63.1, 40.7, 44.2),
            "flant5xxl": (65.2, 45.9, 44.7)}
_DATASETS = {"vqav2": "vqa_val_eval.json", "okvqa": "okvqa_test.json", "gqa": "gqa_testdev_balanced.json"}


def get_config(arg: str = "vqav2_flant5xl") -> ml_collections.ConfigDict:
    if arg == "easy_vqa":  # the demo's: one answer per question, exact match, a short greedy answer
        return eval_config("vqa", DEFAULT_WORKDIR)
    c = base_config("vqa")
    dataset, _, model = arg.partition("_")
    if dataset not in _DATASETS or model not in _TABLE_2:
        raise UnknownName(f"configs/eval/vqa.py presets: easy_vqa or <{'|'.join(_DATASETS)}>_<{'|'.join(_TABLE_2)}>; "
                          f"got {arg!r}")
    t5 = model.startswith("flant5")
    c.checkpoint = HUB_IDS[model]
    c.prompt = PROMPTS["vqa_t5" if t5 else "vqa_opt"]
    set_generation(c, VQA_T5 if t5 else VQA_OPT)
    c.data.annotations = _DATASETS[dataset]
    c.metric = "exact_match" if dataset == "gqa" else "vqa"
    c.published = ml_collections.ConfigDict({"accuracy": _TABLE_2[model][list(_DATASETS).index(dataset)] / 100})
    return c
