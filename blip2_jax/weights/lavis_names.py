"""Salesforce LAVIS checkpoints read by Hugging Face names (spec §12): the rename table both ways,
`load_pth`, and `LavisTensors`, a LAVIS state dict seen as the Hugging Face tensors it holds.

The renames are a table; the one real transform is the EVA attention bias (LAVIS `q_bias`,
`v_bias` <-> HF `qkv.bias` = [q ; 0 ; v]). Strict: every tensor is used once. The only drops are
the spec's, and each is reported: the `position_ids` buffer, the tied copies of the Q-Former LM
head (`decoder.weight` = word embeddings, `decoder.bias` = `predictions.bias`, checked equal) and
ViT blocks past the configured depth (the paper removes EVA's last block).
"""
from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from blip2_jax.errors import InputNotFound
from blip2_jax.models import blip2
from blip2_jax.models import config as config_lib
from blip2_jax.weights.hf_checkpoint import read_tensors, resolve
from blip2_jax.weights.hf_names import CheckpointMismatchError, to_numpy

# LAVIS name <-> HF name (spec §12); {placeholders} match the same text on both sides, and the first
# entry that matches wins in either direction.
_NAMES = [
    ("visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
    ("visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),
    ("visual_encoder.patch_embed.proj.{w}", "vision_model.embeddings.patch_embedding.{w}"),
    ("visual_encoder.blocks.{n}.norm{i}.{w}", "vision_model.encoder.layers.{n}.layer_norm{i}.{w}"),
    ("visual_encoder.blocks.{n}.attn.qkv.weight", "vision_model.encoder.layers.{n}.self_attn.qkv.weight"),
    ("visual_encoder.blocks.{n}.attn.proj.{w}", "vision_model.encoder.layers.{n}.self_attn.projection.{w}"),
    ("visual_encoder.blocks.{n}.mlp.fc{i}.{w}", "vision_model.encoder.layers.{n}.mlp.fc{i}.{w}"),
    ("ln_vision.{w}", "vision_model.post_layernorm.{w}"),
    ("query_tokens", "query_tokens"),
    ("Qformer.bert.embeddings.LayerNorm.{w}", "qformer.layernorm.{w}"),
    ("Qformer.bert.embeddings.{table}_embeddings.weight", "embeddings.{table}_embeddings.weight"),
    ("Qformer.bert.encoder.layer.{n}.{attn}.self.{rest}", "qformer.encoder.layer.{n}.{attn}.attention.{rest}"),
    ("Qformer.bert.encoder.{rest}", "qformer.encoder.{rest}"),
    ("Qformer.cls.predictions.{rest}", "cls.predictions.{rest}"),
    ("vision_proj.{w}", "vision_projection.{w}"),
    ("text_proj.{w}", "text_projection.{w}"),
    ("itm_head.{w}", "itm_head.{w}"),
    ("temp", "temp"),
    ("{llm}_proj.{w}", "language_projection.{w}"),  # stage 2 only: to-lavis writes stage 1
    ("{llm}_model.{rest}", "language_model.{rest}"),
]
# InstructBLIP (`blip2_vicuna_instruct`, `blip2_t5_instruct`): the Q-Former's text embeddings and
# their LayerNorm sit in its own `embeddings` (transformers' conversion of these files).
_INSTRUCT_NAMES = [
    ("Qformer.bert.embeddings.LayerNorm.{w}", "qformer.embeddings.layernorm.{w}"),
    ("Qformer.bert.embeddings.{table}_embeddings.weight", "qformer.embeddings.{table}_embeddings.weight"),
] + [(lavis, hf) for lavis, hf in _NAMES if not lavis.startswith("Qformer.bert.embeddings.")]
_PLACEHOLDERS = {"n": r"\d+", "i": "[12]", "w": r"\w+", "rest": ".+", "table": "word|position",
                 "attn": "attention|crossattention", "llm": "opt|t5|llm"}


def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)  # literal, name, literal, name, ...
    return re.compile("".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>{_PLACEHOLDERS[p]})"
                              for i, p in enumerate(parts)))


_TO_HF = [(_pattern(lavis_name), hf_name) for lavis_name, hf_name in _NAMES]
_INSTRUCT_TO_HF = [(_pattern(lavis_name), hf_name) for lavis_name, hf_name in _INSTRUCT_NAMES]
TO_LAVIS = [(_pattern(hf_name), lavis_name) for lavis_name, hf_name in _NAMES if "{llm}" not in lavis_name]
_QV_BIAS = re.compile(r"visual_encoder\.blocks\.(\d+)\.attn\.([qv])_bias")
_VIT_BLOCK = re.compile(r"visual_encoder\.blocks\.(\d+)\.")
# Tied copies in LAVIS's state dict: copy -> the tensor it must equal.
TIED = {"Qformer.cls.predictions.decoder.weight": "Qformer.bert.embeddings.word_embeddings.weight",
         "Qformer.cls.predictions.decoder.bias": "Qformer.cls.predictions.bias"}
POSITION_IDS = "Qformer.bert.embeddings.position_ids"


def rename(name: str, table: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, template in table:
        m = pattern.fullmatch(name)
        if m:
            return template.format(**m.groupdict())
    return None


def torch_module():
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise ImportError("reading and writing LAVIS .pth files needs PyTorch: pip install -e '.[torch]'") from e
    return torch


def load_pth(path: str | os.PathLike, what: str = "LAVIS checkpoint") -> dict[str, Any]:
    """A `.pth` state dict (LAVIS wraps it as {'model': ...}) memory-mapped with
    `weights_only=True`; anything but a dict of tensor names to tensors is an error naming it."""
    torch = torch_module()

    path = Path(path)
    if not path.is_file():
        raise InputNotFound(f"{what} {path} not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises pickle, zip and runtime errors here
        raise ValueError(f"{path} is not a loadable PyTorch state dict ({type(e).__name__}: {e})") from e
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        kind = type(obj).__name__ if not isinstance(obj, dict) else "a dict that is not name -> tensor"
        raise ValueError(f"{path} holds {kind}, not a state dict (name -> tensor, or LAVIS's {{'model': ...}})")
    return obj


class LavisTensors(Mapping[str, Any]):
    """A LAVIS state dict (plus the towers' own files) seen under Hugging Face names, lazily.

    `notes` lists every tensor dropped or adapted and why; unknown names raise at construction.
    """

    def __init__(self, state: Mapping[str, Any], config: config_lib.Blip2Config, *,
                 vision: Mapping[str, Any] | None = None, text: Mapping[str, Any] | None = None,
                 source: str = "LAVIS checkpoint"):
        self.notes: list[str] = []
        self._get: dict[str, Callable[[], np.ndarray]] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        unknown, tied_errors = [], []
        state = dict(state)
        if vision is not None:
            state.update({k if k.startswith("visual_encoder.") else f"visual_encoder.{k}": v for k, v in vision.items()})
        depth = config.vision.num_hidden_layers
        for key in sorted(state):
            if key == POSITION_IDS:
                self.notes.append(f"dropped {key}: a buffer (arange), not a weight")
                continue
            if key in TIED:
                canon = TIED[key]
                if canon not in state or not np.array_equal(to_numpy(state[key]), to_numpy(state[canon])):
                    tied_errors.append(f"{key} must equal {canon} (tied) but differs or {canon} is absent")
                else:
                    self.notes.append(f"dropped {key}: tied to {canon}")
                continue
            block = _VIT_BLOCK.match(key)
            if block and int(block.group(1)) >= depth:
                self.notes.append(f"dropped {key}: the model keeps the first {depth} ViT blocks (paper §3.4)")
                continue
            qv = _QV_BIAS.fullmatch(key)
            if qv:
                if qv.group(2) == "q":
                    self._qkv_bias(state, int(qv.group(1)))
                continue
            name = rename(key, _INSTRUCT_TO_HF if config.instruction_aware else _TO_HF)
            if name is None:
                unknown.append(key)
                continue
            self._put(name, state[key])
        if text is not None:
            for key, value in text.items():
                self._put("language_model." + self._text_name(key, config), value)
        if unknown or tied_errors:
            raise CheckpointMismatchError(f"{source} has tensors with no place in BLIP-2:\n  "
                                          + "\n  ".join(unknown + tied_errors))
        self._adapt(config)

    def _put(self, name: str, value: Any) -> None:
        self._get[name] = lambda: to_numpy(value)
        self._shape[name] = tuple(value.shape)

    def _qkv_bias(self, state: Mapping[str, Any], layer: int) -> None:
        q, v = (state.get(f"visual_encoder.blocks.{layer}.attn.{x}_bias") for x in "qv")
        if q is None or v is None:
            return  # the missing half is reported by the strict load as a missing qkv.bias
        name = f"vision_model.encoder.layers.{layer}.self_attn.qkv.bias"
        self._get[name] = lambda: np.concatenate([to_numpy(q), np.zeros_like(to_numpy(q)), to_numpy(v)])
        self._shape[name] = (3 * q.shape[0],)

    @staticmethod
    def _text_name(key: str, config: config_lib.Blip2Config) -> str:
        """An LLM checkpoint saved as the bare `OPTModel` (`decoder.*`) or `LlamaModel` (`layers.*`,
        `embed_tokens`, `norm`) lacks the `model.` its causal-LM class puts before them."""
        if isinstance(config.text, config_lib.OPTConfig) and key.startswith("decoder."):
            return "model." + key
        if isinstance(config.text, config_lib.LlamaConfig) and not key.startswith(("model.", "lm_head.")):
            return "model." + key
        return key

    def _adapt(self, config: config_lib.Blip2Config) -> None:
        """Pad the LLM embedding rows up to the model vocabulary with zeros (HF's conversion resized
        OPT's 50272 rows to 50304 for `<image>`, initialising the new rows itself), and interpolate the ViT position table to the model
        grid (spec §2.1), each with a note."""
        if config.text is not None:
            for name, tied in (("language_model.model.decoder.embed_tokens.weight", False),
                               ("language_model.model.embed_tokens.weight", False),
                               ("language_model.shared.weight", False),
                               ("language_model.lm_head.weight", isinstance(config.text, config_lib.OPTConfig))):
                if name in self._shape and self._shape[name][0] < config.text.vocab_size:
                    rows = self._shape[name][0]
                    self._get[name] = functools.partial(_pad_rows, self._get[name], config.text.vocab_size)
                    self._shape[name] = (config.text.vocab_size, self._shape[name][1])
                    self.notes.append(f"padded {name} from {rows} to {config.text.vocab_size} rows with zeros "
                                      f"({'the tied head' if tied else 'rows the model adds: <image>, [PAD]'}: ids >= {rows} did not "
                                      "exist in the source model and now score logit 0)")
        pos = "vision_model.embeddings.position_embedding"
        if pos in self._shape and self._shape[pos][1] != config.vision.num_positions:
            from blip2_jax.models.interpolate import interpolate_position_embedding  # pylint: disable=import-outside-toplevel

            get, grid = self._get[pos], (config.vision.grid, config.vision.grid)
            self._get[pos] = lambda: np.asarray(interpolate_position_embedding(
                get().astype(np.float32), grid, align_corners=False))
            self.notes.append(f"interpolated {pos} from {self._shape[pos][1]} to {config.vision.num_positions} "
                              "positions (bicubic, align_corners=False, as LAVIS at load time)")
            self._shape[pos] = (1, config.vision.num_positions, self._shape[pos][2])

    def __getitem__(self, name: str) -> np.ndarray:
        return self._get[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._get)

    def __len__(self) -> int:
        return len(self._get)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shape[name]


def _pad_rows(get: Callable[[], np.ndarray], rows: int) -> np.ndarray:
    value = get()
    return np.concatenate([value, np.zeros((rows - value.shape[0], *value.shape[1:]), value.dtype)])


def _has(state: Mapping[str, Any], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in state)


def lavis_tensors(src: str | os.PathLike, config: config_lib.Blip2Config, *, vision: str | os.PathLike | None = None,
                  text: str | os.PathLike | None = None) -> tuple[str, LavisTensors]:
    """(architecture, tensors) of the LAVIS `.pth` at `src` for `config` (a preset of ours: a LAVIS
    file names no config), with the towers the file leaves out from `vision` (`eva_vit_g.pth`) and
    `text` (the LLM's Hugging Face directory or hub id). Tensors stay in torch's memory map."""
    state = load_pth(src)
    if config.vision.variant != "eva":
        raise ValueError("from-lavis reads EVA ViT-g checkpoints; LAVIS's CLIP ViT-L (pretrain_vitL) has other names")
    vision_state = None
    if vision is not None:
        vision_state = load_pth(vision, "vision tower checkpoint")
    elif not _has(state, "visual_encoder."):
        raise ValueError(f"{src} has no vision tower (LAVIS checkpoints leave the frozen ViT out): pass --vision "
                         "eva_vit_g.pth")
    text_tensors = None
    if config.text is not None:
        if text is not None:
            text_tensors = read_tensors(resolve(text))
        elif not any(_has(state, f"{llm}_model.") for llm in ("opt", "t5", "llm")):
            raise ValueError(f"{src} has no language model (LAVIS checkpoints leave the frozen LLM out): pass "
                             "--text with its Hugging Face directory or hub id (e.g. facebook/opt-2.7b)")
    architecture = blip2.architecture_of(config, itg_head="temp" in state)
    return architecture, LavisTensors(state, config, vision=vision_state, text=text_tensors, source=str(src))
