"""Model configurations: frozen dataclasses (hashable, so Flax modules can hold them) and their
translation to and from Hugging Face `config.json` dictionaries.

Field names follow the Hugging Face configs they mirror, so `from_hf`/`to_hf` are renames, not
semantics. Presets for the published models live in `models/presets.py`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from blip2_jax.models.lora import LoraConfig


def _take(cls, d: Mapping[str, Any], renames: Mapping[str, str] = ()) -> Any:
    """Build dataclass `cls` from the keys of `d` it knows (after `renames` hf_key -> field)."""
    renames = dict(renames)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in d.items():
        name = renames.get(key, key)
        if name in fields:
            kwargs[name] = value
    return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """EVA ViT-g/14 (HF `Blip2VisionConfig`) or LAVIS's CLIP ViT-L/14 (`variant='clip'`)."""

    variant: str = "eva"  # 'eva': HF Blip2VisionModel; 'clip': LAVIS clip_vit (ln_pre, QuickGELU)
    hidden_size: int = 1408
    intermediate_size: int = 6144
    num_hidden_layers: int = 39
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    # ln_vision / post_layernorm eps: HF builds it with layer_norm_eps (1e-6), LAVIS uses 1e-5 (spec §13.1).
    post_layernorm_eps: float | None = None
    attention_dropout: float = 0.0

    def __post_init__(self):
        if self.variant not in ("eva", "clip"):
            raise ValueError(f"VisionConfig.variant must be 'eva' or 'clip', got {self.variant!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid * self.grid + 1

    @property
    def ln_vision_eps(self) -> float:
        return self.layer_norm_eps if self.post_layernorm_eps is None else self.post_layernorm_eps


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
    """HF `Blip2QFormerConfig`; `use_qformer_text_input` adds the text FFN and text embeddings."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408
    use_qformer_text_input: bool = False

    def __post_init__(self):
        if self.num_hidden_layers < 1 or self.cross_attention_frequency < 1:
            raise ValueError(
                f"Q-Former num_hidden_layers ({self.num_hidden_layers}) and cross_attention_frequency "
                f"({self.cross_attention_frequency}) must both be at least 1")

    @property
    def layer_groups(self) -> tuple[int, int]:
        """(full groups of `cross_attention_frequency` layers, layers in the last, shorter group).

        Layer i has cross-attention when i % cross_attention_frequency == 0 (transformers'
        `Blip2QFormerLayer`, LAVIS's `BertLayer`), so every group, the short one included, starts
        with the one cross-attention layer it has."""
        return divmod(self.num_hidden_layers, self.cross_attention_frequency)


@dataclasses.dataclass(frozen=True)
class OPTConfig:
    """HF `OPTConfig` (decoder-only LM)."""

    vocab_size: int = 50272
    hidden_size: int = 2560
    ffn_dim: int = 10240
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    max_position_embeddings: int = 2048
    word_embed_proj_dim: int | None = None
    do_layer_norm_before: bool = True
    remove_final_layer_norm: bool = False
    activation_function: str = "relu"
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    dropout: float = 0.1
    attention_dropout: float = 0.0
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2

    model_type = "opt"
    is_encoder_decoder = False

    def __post_init__(self):
        if self.word_embed_proj_dim is None:  # HF resolves a missing value to hidden_size
            object.__setattr__(self, "word_embed_proj_dim", self.hidden_size)

    @property
    def embed_dim(self) -> int:
        return self.word_embed_proj_dim

    @property
    def has_final_layer_norm(self) -> bool:
        return self.do_layer_norm_before and not self.remove_final_layer_norm


@dataclasses.dataclass(frozen=True)
class T5Config:
    """HF `T5Config` (encoder-decoder LM). BLIP-2 FlanT5 uses gated exact `gelu`, untied head."""

    vocab_size: int = 32128
    d_model: int = 2048
    d_kv: int = 64
    d_ff: int = 5120
    num_layers: int = 24
    num_decoder_layers: int | None = None
    num_heads: int = 32
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    dense_act_fn: str = "gelu"
    # Original T5 ties the head and rescales decoder outputs by d_model**-0.5; T5 v1.1/FlanT5 do neither.
    tie_word_embeddings: bool = False
    # transformers 5 writes this explicitly (and always writes tie_word_embeddings=True); older
    # configs leave it out and mean "scale iff tied". None resolves to that rule.
    scale_decoder_outputs: bool | None = None
    pad_token_id: int = 0
    eos_token_id: int = 1
    bos_token_id: int | None = None
    decoder_start_token_id: int = 0

    model_type = "t5"
    is_encoder_decoder = True

    def __post_init__(self):
        if self.scale_decoder_outputs is None:
            object.__setattr__(self, "scale_decoder_outputs", self.tie_word_embeddings)
        if self.num_decoder_layers is None:  # HF: symmetric by default
            object.__setattr__(self, "num_decoder_layers", self.num_layers)

    @property
    def is_gated_act(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def decoder_layers(self) -> int:
        return self.num_decoder_layers

    @property
    def hidden_size(self) -> int:
        return self.d_model


ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """HF `LlamaConfig` (decoder-only LM: LLaMA, Vicuna, and the family transformers builds with
    it). The rotary scaling is HF's `rope_parameters`, flattened into `rope_*` fields: `rope_type`
    one of ROPE_TYPES, with the fields that type reads (transformers' `modeling_rope_utils`)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float | None = None
    rope_original_max_position_embeddings: int | None = None
    rope_low_freq_factor: float | None = None  # llama3
    rope_high_freq_factor: float | None = None  # llama3
    rope_attention_factor: float | None = None  # yarn
    rope_beta_fast: float | None = None  # yarn
    rope_beta_slow: float | None = None  # yarn
    rope_mscale: float | None = None  # yarn
    rope_mscale_all_dim: float | None = None  # yarn
    rope_truncate: bool = True  # yarn
    pad_token_id: int | None = None
    bos_token_id: int = 1
    eos_token_id: int = 2

    model_type = "llama"
    is_encoder_decoder = False

    def __post_init__(self):
        if self.num_key_value_heads is None:  # HF: multi-head attention unless given
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type {self.rope_type!r} is not supported; blip2_jax has {', '.join(ROPE_TYPES)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")


TextConfig = OPTConfig | T5Config | LlamaConfig


@dataclasses.dataclass(frozen=True)
class Blip2Config:
    """A whole BLIP-2 model: vision tower, Q-Former, and an LLM (None for the retrieval model).

    `dtype` is the compute dtype, `param_dtype` the storage dtype of parameters (design
    decision 6); `remat_policy` names a `layers.REMAT_POLICIES` entry applied to every stack.
    """

    vision: VisionConfig = VisionConfig()
    qformer: QFormerConfig = QFormerConfig()
    text: TextConfig | None = OPTConfig()
    num_query_tokens: int = 32
    image_text_hidden_size: int = 256
    image_token_index: int | None = None
    # InstructBLIP: the Q-Former reads the instruction's tokens beside its queries (HF
    # `InstructBlipForConditionalGeneration`, model_type "instructblip")
    instruction_aware: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    # LoRA adapters on dense layers (models/lora.py); rank 0: none
    lora: LoraConfig = LoraConfig()
    # dense layers (regexes over their paths) whose frozen kernels are int8 (models/quantization.py)
    int8: tuple[str, ...] = ()

    def __post_init__(self):
        if isinstance(self.lora, Mapping):  # read back from a JSON / ConfigDict
            object.__setattr__(self, "lora", LoraConfig(**self.lora))
        object.__setattr__(self, "int8", tuple(self.int8))
        if self.qformer.encoder_hidden_size != self.vision.hidden_size:
            raise ValueError(
                f"qformer.encoder_hidden_size ({self.qformer.encoder_hidden_size}) must equal the vision "
                f"hidden_size ({self.vision.hidden_size})")

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def replace(self, **kwargs) -> "Blip2Config":
        return dataclasses.replace(self, **kwargs)


# ---------------------------------------------------------------------------------------------
# Hugging Face config.json <-> ours.

_OPT_RENAMES = {"_remove_final_layer_norm": "remove_final_layer_norm"}


def text_config_from_hf(d: Mapping[str, Any]) -> TextConfig:
    model_type = d.get("model_type")
    if model_type == "opt":
        return _take(OPTConfig, d, _OPT_RENAMES)
    if model_type == "t5":
        d = dict(d)
        if "scale_decoder_outputs" in d:  # transformers 5 writes tie_word_embeddings=True regardless
            d["tie_word_embeddings"] = d["scale_decoder_outputs"]
        cfg = _take(T5Config, d)
        if "dense_act_fn" not in d:  # HF derives it: 'gated-gelu' means gelu_new (T5 v1.1 legacy)
            act = "gelu_new" if cfg.feed_forward_proj == "gated-gelu" else cfg.feed_forward_proj.split("-")[-1]
            cfg = dataclasses.replace(cfg, dense_act_fn=act)
        return cfg
    if model_type == "llama":
        return llama_config_from_hf(d)
    raise ValueError(f"unsupported text_config.model_type {model_type!r}: blip2_jax supports 'opt', 't5' and "
                     "'llama'")


_ROPE_KEYS = ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor",
              "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate")


def llama_config_from_hf(d: Mapping[str, Any]) -> LlamaConfig:
    """HF LLaMA config dict -> ours: transformers 5's `rope_parameters`, or the older `rope_theta`
    with a `rope_scaling` dict (its `type` or `rope_type`)."""
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    rope.setdefault("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("rope_parameters.partial_rotary_factor != 1 is not a LLaMA rotary embedding")
    if d.get("pretraining_tp", 1) not in (None, 1):
        raise ValueError(f"pretraining_tp={d['pretraining_tp']} (sliced matmuls) is not supported; it must be 1")
    fields = {f"rope_{k}": rope[k] for k in _ROPE_KEYS if rope.get(k) is not None}
    return _take(LlamaConfig, {**d, **fields, "rope_theta": float(rope["rope_theta"]), "rope_type": rope_type})


def llama_config_to_hf(cfg: LlamaConfig) -> dict[str, Any]:
    rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta,
            **{k: getattr(cfg, f"rope_{k}") for k in _ROPE_KEYS if getattr(cfg, f"rope_{k}") is not None}}
    if cfg.rope_type != "yarn" or cfg.rope_truncate:  # HF reads a missing `truncate` as True
        rope.pop("truncate", None)
    out = {k: v for k, v in dataclasses.asdict(cfg).items() if not k.startswith("rope_")}
    return {**out, "rope_parameters": rope, "model_type": "llama"}


def vision_config_from_hf(d: Mapping[str, Any]) -> VisionConfig:
    if d.get("model_type", "blip_2_vision_model") not in ("blip_2_vision_model", "instructblip_vision_model"):
        raise ValueError(f"unsupported vision_config.model_type {d.get('model_type')!r}")
    if not d.get("qkv_bias", True):
        raise ValueError("vision_config.qkv_bias=False is not a BLIP-2 vision tower")
    return _take(VisionConfig, d)


def from_hf(d: Mapping[str, Any], **overrides) -> Blip2Config:
    """A `Blip2Config` from a Hugging Face BLIP-2 `config.json` dictionary.

    The retrieval model (`Blip2ForImageTextRetrieval`, no LLM) is recognised by `architectures`,
    or without it by a Q-Former with text input.
    """
    if d.get("model_type") not in (None, "blip-2", "instructblip"):
        raise ValueError(f"config.json model_type is {d.get('model_type')!r}, expected 'blip-2' or 'instructblip'")
    vision = vision_config_from_hf(d.get("vision_config") or {})
    instruction_aware = d.get("model_type") == "instructblip"
    qformer = _take(QFormerConfig, dict(d.get("qformer_config") or {}, encoder_hidden_size=vision.hidden_size,
                                        **({"use_qformer_text_input": True} if instruction_aware else {})))
    architectures = d.get("architectures") or []
    if instruction_aware:
        is_retrieval = False
    elif architectures:
        is_retrieval = "Blip2ForImageTextRetrieval" in architectures
    else:  # HF configs always carry a (default) text_config; the text Q-Former marks retrieval
        is_retrieval = qformer.use_qformer_text_input or not d.get("text_config")
    text = None if is_retrieval else text_config_from_hf(d["text_config"])
    image_token_index = d.get("image_token_index", d.get("image_token_id"))
    return Blip2Config(vision=vision, qformer=qformer, text=text,
                       num_query_tokens=d.get("num_query_tokens", 32),
                       image_text_hidden_size=d.get("image_text_hidden_size", 256),
                       image_token_index=image_token_index, instruction_aware=instruction_aware, **overrides)


def _as_dict(cfg: Any, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in drop}


def to_hf(cfg: Blip2Config) -> dict[str, Any]:
    """The Hugging Face `config.json` dictionary for `cfg` (loadable by `transformers.Blip2Config`)."""
    if cfg.vision.variant != "eva":
        raise ValueError("only the EVA vision tower has a Hugging Face BLIP-2 counterpart (spec §2.3)")
    vision = _as_dict(cfg.vision, drop=("variant", "post_layernorm_eps"))
    if cfg.vision.post_layernorm_eps not in (None, cfg.vision.layer_norm_eps):
        raise ValueError("Hugging Face builds post_layernorm with vision layer_norm_eps; "
                         f"post_layernorm_eps={cfg.vision.post_layernorm_eps} cannot be expressed")
    instruct = cfg.instruction_aware
    vision.update(model_type="instructblip_vision_model" if instruct else "blip_2_vision_model", qkv_bias=True)
    qformer = _as_dict(cfg.qformer)
    qformer["model_type"] = "instructblip_qformer" if instruct else "blip_2_qformer"
    out: dict[str, Any] = {
        "model_type": "instructblip" if instruct else "blip-2",
        "vision_config": vision,
        "qformer_config": qformer,
        "num_query_tokens": cfg.num_query_tokens,
        "image_text_hidden_size": cfg.image_text_hidden_size,
        "image_token_index": cfg.image_token_index,
    }
    if cfg.text is None:
        out["architectures"] = ["Blip2ForImageTextRetrieval"]
    else:
        out["architectures"] = ["InstructBlipForConditionalGeneration" if instruct else "Blip2ForConditionalGeneration"]
        text = llama_config_to_hf(cfg.text) if isinstance(cfg.text, LlamaConfig) else _as_dict(cfg.text)
        if isinstance(cfg.text, OPTConfig):
            text["_remove_final_layer_norm"] = text.pop("remove_final_layer_norm")
        text["model_type"] = cfg.text.model_type
        out["text_config"] = text
    return out
