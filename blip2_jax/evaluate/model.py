"""The model an evaluation runs: from a Hugging Face directory or hub id, a model checkpoint
(`blip2-jax convert`) or a training workdir, with its parameters placed on the mesh."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import Mesh

from blip2_jax.convert.hf_checkpoint import load_pretrained
from blip2_jax.convert.model_checkpoint import METADATA, CheckpointParams, cast_like
from blip2_jax.evaluate.batches import place_params
from blip2_jax.models import blip2
from blip2_jax.models.config import Blip2Config


@dataclasses.dataclass(frozen=True)
class EvalModel:
    module: nn.Module
    config: Blip2Config
    params: Any  # on the mesh
    tokenizer: str  # where the checkpoint's tokenizer is ("" if it has none)


def load_model(checkpoint: str | os.PathLike, mesh: Mesh, *, step: int | None = None,
               dtype: str | None = None) -> EvalModel:
    """`checkpoint`: a model checkpoint or training workdir (read with `CheckpointParams`), else a
    Hugging Face directory or hub id. `dtype` (e.g. bfloat16) is storage and compute dtype."""
    path = Path(checkpoint)
    overrides = {} if dtype is None else dict(dtype=jnp.dtype(dtype).name, param_dtype=jnp.dtype(dtype).name)
    if (path / METADATA).exists() or (path / "checkpoints").exists() or path.parent.name == "checkpoints":
        source = CheckpointParams.open(path, step)
        config = source.config.replace(**overrides) if overrides else source.config
        module, tree, tokenizer = blip2.build(config, source.architecture), source.tree(), source.tokenizer
    else:
        config, tree = load_pretrained(checkpoint, dtype=dtype, **overrides)
        module, tokenizer = blip2.build(config), str(path) if path.is_dir() else str(checkpoint)
    boxed = blip2.abstract_params(config, unbox=False, model=module)
    tree = cast_like(tree, nn.unbox(boxed))
    return EvalModel(module, config, place_params(tree, boxed, mesh), tokenizer)

