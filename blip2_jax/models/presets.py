"""Model presets: the published BLIP-2 checkpoints, the ViT-L variants, and tiny test models.

Each full-size preset reproduces its Hugging Face hub `config.json` (spec §11.1) or, for the
ViT-L variants that have no HF port, LAVIS's model definition (spec §2.3). `HUB_IDS` names where
the weights are published. Configs under `configs/` expose these through `get_config(arg)`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from blip2_jax.errors import UnknownName
from blip2_jax.models.config import Blip2Config, LlamaConfig, OPTConfig, QFormerConfig, T5Config, VisionConfig

EVA_G = VisionConfig()  # EVA ViT-g/14, 39 blocks, 224 px
CLIP_L = VisionConfig(variant="clip", hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                      num_attention_heads=16, hidden_act="quick_gelu", layer_norm_eps=1e-5)
QFORMER = QFormerConfig()  # BERT-base, cross-attention every 2nd layer
QFORMER_TEXT = QFormerConfig(vocab_size=30523, use_qformer_text_input=True)  # + [DEC], text FFN

# OPT as in the hub configs: vocab resized to 50265 + <image>, padded to a multiple of 64;
# eos = "\n" (50118) as BLIP-2 generates.
OPT_2_7B = OPTConfig(vocab_size=50304, hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32,
                     eos_token_id=50118)
OPT_6_7B = dataclasses.replace(OPT_2_7B, hidden_size=4096, ffn_dim=16384, word_embed_proj_dim=4096)
# FlanT5 with exact GELU (BLIP-2's dense_act_fn), untied head, bos = </s> (spec §11.1).
FLAN_T5_XL = T5Config(d_model=2048, d_ff=5120, num_layers=24, num_heads=32, bos_token_id=1)
FLAN_T5_XXL = dataclasses.replace(FLAN_T5_XL, d_model=4096, d_ff=10240, num_heads=64)
OPT_IMAGE_TOKEN, T5_IMAGE_TOKEN = 50265, 32100
# InstructBLIP's Vicuna (transformers' conversion: LLaMA 7B/13B configs with the vocabulary grown by
# [PAD] to 32001; the LLaMA tokenizer's <s>=1, </s>=2, [PAD]=32000). No <image> token: the
# published configs prepend the visual prompt (legacy layout).
VICUNA_7B = LlamaConfig(vocab_size=32001, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6, pad_token_id=32000)
VICUNA_13B = dataclasses.replace(VICUNA_7B, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                 num_attention_heads=40, num_key_value_heads=40, head_dim=128)


def _coco(cfg: Blip2Config) -> Blip2Config:
    """COCO-finetuned checkpoints run at 364 px (26x26 patches + CLS)."""
    return cfg.replace(vision=dataclasses.replace(cfg.vision, image_size=364))


def _tiny_base() -> dict[str, Any]:
    return dict(vision=VisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4),
                num_query_tokens=8, image_text_hidden_size=16)


def _tiny_qformer(**kw) -> QFormerConfig:
    return QFormerConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64, encoder_hidden_size=32, **kw)


def _demo(text: OPTConfig | None) -> Blip2Config:
    """`blip2-jax demo`'s model: easy-VQA's 64 px images in 8x8 patches (a random 2-layer ViT), a
    2-layer Q-Former with 4 queries and a 3-layer OPT over the demo's 64-word vocabulary
    (`demo/tokenizers.py`). In OPT's input the 4 queries take the positions "<s> a red circle" have
    in the LM's text, so the positions it learnt line up. No dropout: BLIP-2's 0.1 is for a
    Q-Former that starts from BERT; from random init the features of different texts differ by
    ~1e-3, far below the dropout noise, and ITC never starts learning."""
    return Blip2Config(
        vision=VisionConfig(image_size=64, patch_size=8, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=4),
        qformer=QFormerConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=128, max_position_embeddings=32, encoder_hidden_size=128,
                              cross_attention_frequency=1, use_qformer_text_input=text is None,
                              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        text=text, num_query_tokens=4, image_text_hidden_size=32,
        image_token_index=None if text is None else DEMO_IMAGE_TOKEN)


DEMO_IMAGE_TOKEN = 5
DEMO_OPT = OPTConfig(vocab_size=64, hidden_size=64, ffn_dim=256, num_hidden_layers=3, num_attention_heads=8,
                     dropout=0.0, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)

_PRESETS: dict[str, Blip2Config] = {
    "opt2.7b": Blip2Config(vision=EVA_G, qformer=QFORMER, text=OPT_2_7B, image_token_index=OPT_IMAGE_TOKEN),
    "opt6.7b": Blip2Config(vision=EVA_G, qformer=QFORMER, text=OPT_6_7B, image_token_index=OPT_IMAGE_TOKEN),
    "flant5xl": Blip2Config(vision=EVA_G, qformer=QFORMER, text=FLAN_T5_XL, image_token_index=T5_IMAGE_TOKEN),
    "flant5xxl": Blip2Config(vision=EVA_G, qformer=QFORMER, text=FLAN_T5_XXL, image_token_index=T5_IMAGE_TOKEN),
    "itm_vit_g": Blip2Config(vision=EVA_G, qformer=QFORMER_TEXT, text=None),
    # LAVIS pretrain_vitL / pretrain_flant5xl_vitL: CLIP ViT-L/14 (no HF port; ln_vision eps 1e-5).
    "itm_vit_l": Blip2Config(vision=CLIP_L, qformer=dataclasses.replace(QFORMER_TEXT, encoder_hidden_size=1024),
                             text=None),
    "flant5xl_vit_l": Blip2Config(vision=CLIP_L, qformer=dataclasses.replace(QFORMER, encoder_hidden_size=1024),
                                  text=FLAN_T5_XL, image_token_index=T5_IMAGE_TOKEN),
    "tiny": Blip2Config(qformer=_tiny_qformer(), text=OPTConfig(vocab_size=128, hidden_size=32, ffn_dim=64,
                                                                  num_hidden_layers=2, num_attention_heads=4,
                                                                  max_position_embeddings=64),
                        image_token_index=127, **_tiny_base()),
    "tiny_t5": Blip2Config(qformer=_tiny_qformer(), text=T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64,
                                                                     num_layers=2, num_heads=4,
                                                                     relative_attention_num_buckets=8),
                           image_token_index=127, **_tiny_base()),
    "tiny_itm": Blip2Config(qformer=_tiny_qformer(use_qformer_text_input=True), text=None, **_tiny_base()),
    # InstructBLIP at test size: a LLaMA with 2 K/V heads for 4 query heads, the instruction-reading Q-Former
    "tiny_instruct": Blip2Config(qformer=_tiny_qformer(use_qformer_text_input=True), instruction_aware=True,
                                 text=LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                  max_position_embeddings=64, pad_token_id=0),
                                 **_tiny_base()),
    # InstructBLIP: the Q-Former (BERT-base + [DEC], with its text embeddings and FFN) reads the instruction
    **{f"instruct_{name}": Blip2Config(vision=EVA_G, qformer=QFORMER_TEXT, text=text, instruction_aware=True)
       for name, text in (("vicuna7b", VICUNA_7B), ("vicuna13b", VICUNA_13B), ("flant5xl", FLAN_T5_XL),
                          ("flant5xxl", FLAN_T5_XXL))},
    "demo": _demo(DEMO_OPT),
    "demo_itm": _demo(None),
    # the instruction demo's InstructBLIP: the demo model whose Q-Former also reads the instruction
    # with its text side (embeddings, text FFN), all of which stage 1 (`demo_itm`) trained
    "demo_instruct": dataclasses.replace(
        _demo(DEMO_OPT), instruction_aware=True,
        qformer=dataclasses.replace(_demo(DEMO_OPT).qformer, use_qformer_text_input=True)),
}
for _name in ("opt2.7b", "opt6.7b", "flant5xl", "itm_vit_g"):
    _PRESETS[f"{_name}-coco"] = _coco(_PRESETS[_name])

# Where the published weights are (Hugging Face hub); LAVIS-only presets have none.
HUB_IDS = {
    "opt2.7b": "Salesforce/blip2-opt-2.7b", "opt6.7b": "Salesforce/blip2-opt-6.7b",
    "opt2.7b-coco": "Salesforce/blip2-opt-2.7b-coco", "opt6.7b-coco": "Salesforce/blip2-opt-6.7b-coco",
    "flant5xl": "Salesforce/blip2-flan-t5-xl", "flant5xl-coco": "Salesforce/blip2-flan-t5-xl-coco",
    "flant5xxl": "Salesforce/blip2-flan-t5-xxl",
    "itm_vit_g": "Salesforce/blip2-itm-vit-g", "itm_vit_g-coco": "Salesforce/blip2-itm-vit-g-coco",
    **{f"instruct_{name}": f"Salesforce/instructblip-{hub}" for name, hub in (
        ("vicuna7b", "vicuna-7b"), ("vicuna13b", "vicuna-13b"), ("flant5xl", "flan-t5-xl"),
        ("flant5xxl", "flan-t5-xxl"))},
}
PUBLISHED = ("opt2.7b", "opt6.7b", "flant5xl", "flant5xxl", "itm_vit_g", "instruct_vicuna7b", "instruct_vicuna13b",
             "instruct_flant5xl", "instruct_flant5xxl")


def names() -> list[str]:
    return sorted(_PRESETS)


def get(name: str) -> Blip2Config:
    if name not in _PRESETS:
        raise UnknownName(f"unknown model preset {name!r}; known: {', '.join(names())}")
    return _PRESETS[name]


def to_config_dict(cfg: Blip2Config) -> ml_collections.ConfigDict:
    """`cfg` as an ml_collections ConfigDict (every field overridable with --config.model.x=y)."""
    d = dataclasses.asdict(cfg)
    d["text_type"] = None if cfg.text is None else cfg.text.model_type
    if d["text"] is None:
        d["text"] = {}
    return ml_collections.ConfigDict(d)


def from_config_dict(cd: ml_collections.ConfigDict | dict) -> Blip2Config:
    """Inverse of `to_config_dict`."""
    d = cd.to_dict() if isinstance(cd, ml_collections.ConfigDict) else dict(cd)
    text_cls = {"opt": OPTConfig, "t5": T5Config, "llama": LlamaConfig, None: None}[d.pop("text_type")]
    return Blip2Config(vision=VisionConfig(**d.pop("vision")), qformer=QFormerConfig(**d.pop("qformer")),
                       text=None if text_cls is None else text_cls(**d.pop("text")),
                       **{k: v for k, v in d.items() if k != "text"})
