"""Load a Hugging Face BLIP-2 checkpoint (directory, hub id, or torch state dict) into Flax.

A directory holds `config.json` and either `model.safetensors` or sharded
`model-0000x-of-0000y.safetensors` with `model.safetensors.index.json`. Loading is strict
(see `hf_names.from_hf`): one error lists every missing, unexpected or mis-shaped tensor, and
no parameters are returned unless all of them load.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from absl import logging

from blip2_jax.errors import InputNotFound
from blip2_jax.models import blip2
from blip2_jax.models import config as config_lib
from blip2_jax.models.interpolate import interpolate_position_embedding
from blip2_jax.weights.hf_names import CheckpointMismatchError, from_hf
from blip2_jax.weights.safetensors_io import SafetensorsFiles

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
# Stage 1's Q-Former LM head and `temp`, which no Hugging Face class holds, beside the weights
STAGE1_EXTRAS = "blip2_jax_stage1.safetensors"


def resolve(path_or_id: str | os.PathLike, *, extra_patterns: tuple[str, ...] = ()) -> Path:
    """A local checkpoint directory; a hub id (e.g. `Salesforce/blip2-opt-2.7b`) is downloaded
    through `huggingface_hub` (config, safetensors and `extra_patterns`) when the network allows."""
    path = Path(path_or_id)
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{path} is a file; a Hugging Face checkpoint is a directory with config.json")
    if str(path_or_id).count("/") != 1 or str(path_or_id).startswith((".", "/")):
        raise InputNotFound(f"no checkpoint directory at {path} (and it is not a hub id 'org/name')")
    from huggingface_hub import snapshot_download  # pylint: disable=import-outside-toplevel

    patterns = ["config.json", "*.safetensors", SAFE_INDEX, *extra_patterns]
    return Path(snapshot_download(str(path_or_id), allow_patterns=patterns))


def read_config(directory: Path) -> dict[str, Any]:
    file = directory / "config.json"
    if not file.is_file():
        raise InputNotFound(f"{file} not found: a Hugging Face checkpoint needs its config.json")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e


def read_tensors(directory: Path, extra_files: tuple[Path, ...] = ()) -> SafetensorsFiles:
    """Every tensor of a single-file or index-sharded safetensors checkpoint (plus `extra_files`),
    as a lazy mapping: headers checked now, each tensor read when it is used."""
    index = directory / SAFE_INDEX
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a safetensors index (JSON with a weight_map): {e}") from e
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing:
            raise InputNotFound(f"{index} lists shards that are not in {directory}: {missing}")
        return SafetensorsFiles([directory / s for s in shards] + list(extra_files), expected=weight_map)
    single = directory / SAFE_WEIGHTS
    if not single.is_file():
        raise InputNotFound(f"{directory} has neither {SAFE_WEIGHTS} nor {SAFE_INDEX}")
    return SafetensorsFiles([single, *extra_files])


def hf_architecture(directory: Path, config: config_lib.Blip2Config) -> str:
    """Stage 1 keeps its Q-Former LM head and `temp` in a side file beside Hugging Face's weights."""
    return blip2.architecture_of(config, itg_head=(directory / STAGE1_EXTRAS).is_file())


def hf_tensors(directory: Path, architecture: str) -> SafetensorsFiles:
    """The weights (and for stage 1 the side file) of a Hugging Face directory, read lazily."""
    return read_tensors(directory, (directory / STAGE1_EXTRAS,) if architecture == "Blip2Stage1" else ())


def params_from_state_dict(state_dict: Mapping[str, Any], config: config_lib.Blip2Config, *,
                           dtype: Any = None, source: str = "state dict") -> Any:
    """Flax parameters for `config` from a Hugging Face state dict (torch or numpy tensors)."""
    abstract = blip2.abstract_params(config)
    return from_hf(state_dict, abstract, qformer_group=config.qformer.cross_attention_frequency,
                   dtype=dtype, source=source)


def config_differences(a: config_lib.Blip2Config, b: config_lib.Blip2Config) -> list[str]:
    diffs = []
    for part in ("vision", "qformer", "text"):
        x, y = getattr(a, part), getattr(b, part)
        if type(x) is not type(y):
            diffs.append(f"{part}: {type(x).__name__} vs {type(y).__name__}")
            continue
        if x is None:
            continue
        for f in dataclasses.fields(x):
            if getattr(x, f.name) != getattr(y, f.name):
                diffs.append(f"{part}.{f.name}: {getattr(x, f.name)!r} vs {getattr(y, f.name)!r}")
    for f in ("num_query_tokens", "image_text_hidden_size", "image_token_index", "lora", "int8"):
        if getattr(a, f) != getattr(b, f):
            diffs.append(f"{f}: {getattr(a, f)!r} vs {getattr(b, f)!r}")
    return diffs


def load_pretrained(path_or_id: str | os.PathLike, *, config: config_lib.Blip2Config | None = None,
                    dtype: Any = None, **overrides) -> tuple[config_lib.Blip2Config, Any]:
    """(config, params) from a Hugging Face BLIP-2 checkpoint directory or hub id.

    `config`, when given, must agree with the checkpoint's config.json (architecture fields),
    except in `vision.image_size`: fine-tuning starts 364 or 490 px models from the 224 px
    checkpoints, so the ViT position table is then resized bicubically (align_corners=False, as
    LAVIS and HF's `interpolate_pos_encoding` do for EVA ViT-g, spec §2.1) and logged.
    `overrides` set non-architectural fields (`dtype`, `param_dtype`, `remat_policy`).
    """
    directory = resolve(path_or_id)
    found = config_lib.from_hf(read_config(directory), **overrides)
    resize = config is not None and config.vision.image_size != found.vision.image_size
    if config is not None:
        vision = dataclasses.replace(found.vision, image_size=config.vision.image_size)
        at_size = dataclasses.replace(found, vision=vision)
        diffs = config_differences(config, at_size)
        if diffs:
            raise CheckpointMismatchError(f"{directory}/config.json does not match the requested config "
                                          "(requested vs checkpoint):\n  " + "\n  ".join(diffs))
    params = params_from_state_dict(read_tensors(directory), found, dtype=dtype, source=str(directory))
    if resize:
        embeddings = params["vision_model"]["embeddings"]
        table = embeddings["position_embedding"]
        resized = interpolate_position_embedding(np.asarray(table, np.float32), (config.vision.grid,) * 2,
                                                 align_corners=False)
        embeddings["position_embedding"] = np.asarray(resized).astype(table.dtype)
        logging.info("%s: interpolated the ViT position table from %d to %d px (%d to %d positions)", directory,
                     found.vision.image_size, config.vision.image_size, table.shape[1], config.vision.num_positions)
    return (found if config is None else config), params
