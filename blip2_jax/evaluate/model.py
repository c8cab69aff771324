"""The model an evaluation runs: from a Hugging Face directory or hub id, a model checkpoint
(`blip2-jax convert`) or a training workdir, its parameters read straight into their shardings on
the mesh (`weights/load.py`)."""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import Mesh

from blip2_jax.models import blip2
from blip2_jax.models.config import Blip2Config
from blip2_jax.weights.load import load


@dataclasses.dataclass(frozen=True)
class EvalModel:
    module: nn.Module
    config: Blip2Config
    params: Any  # on the mesh
    tokenizer: str  # where the checkpoint's tokenizer is ("" if it has none)


def load_model(checkpoint: str | os.PathLike, mesh: Mesh, *, step: int | None = None,
               dtype: str | None = None) -> EvalModel:
    """`checkpoint`: a model checkpoint or training workdir (latest step, or `step`), else a Hugging
    Face directory or hub id. `dtype` (e.g. bfloat16) is storage and compute dtype."""
    overrides = {} if dtype is None else dict(dtype=jnp.dtype(dtype).name, param_dtype=jnp.dtype(dtype).name)
    loaded = load(checkpoint, mesh=mesh, step=step, dtype=dtype, **overrides)
    return EvalModel(blip2.build(loaded.config, loaded.architecture), loaded.config, loaded.params, loaded.tokenizer)
