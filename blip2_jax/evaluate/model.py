"""The model an evaluation runs: from a Hugging Face directory or hub id, a model checkpoint
(`blip2-jax convert`) or a training workdir, its parameters read straight into their shardings on
the mesh (`weights/load.py`)."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import Mesh

from blip2_jax.data.tokenizers import instruction_tokenizer, language_tokenizer, qformer_tokenizer
from blip2_jax.errors import UserError
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
               dtype: str | None = None, int8: Sequence[str] = ()) -> EvalModel:
    """`checkpoint`: a model checkpoint or training workdir (latest step, or `step`), else a Hugging
    Face directory or hub id. `dtype` (e.g. bfloat16) is storage and compute dtype; `int8` the dense
    layers run with int8 kernels (`weights.load`)."""
    overrides = {} if dtype is None else dict(dtype=jnp.dtype(dtype).name, param_dtype=jnp.dtype(dtype).name)
    loaded = load(checkpoint, mesh=mesh, step=step, dtype=dtype, int8=int8, **overrides)
    return EvalModel(blip2.build(loaded.config, loaded.architecture), loaded.config, loaded.params, loaded.tokenizer)


def tokenizer_path(model: EvalModel, tokenizer: str = "") -> str:
    """`tokenizer` if given, else the checkpoint's own (a user error if it has none)."""
    path = tokenizer or model.tokenizer
    if not path:
        raise UserError("the checkpoint names no tokenizer: give one (--tokenizer, or --config.tokenizer for eval)")
    return path


def generation_tokenizers(model: EvalModel, tokenizer: str = "") -> dict[str, Any]:
    """The LLM's tokenizer, and an InstructBLIP's Q-Former one from the same directory (its
    processor's `qformer_tokenizer/`), or a stage-1 model's BERT tokenizer: the keyword arguments
    `generate_texts` takes them as."""
    path = tokenizer_path(model, tokenizer)
    if model.config.text is None:  # a stage-1 model captions with its Q-Former's own (BERT) tokenizer
        return dict(tokenizer=qformer_tokenizer(path), qformer_tokenizer=None)
    qformer = instruction_tokenizer(path) if model.config.instruction_aware else None
    return dict(tokenizer=language_tokenizer(path), qformer_tokenizer=qformer)
