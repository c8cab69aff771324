"""Start stage 2 from a stage-1 run (spec §3.6), as LAVIS's `Blip2OPT`/`Blip2T5` load a
`Blip2Qformer` checkpoint.

Stage 2 keeps what the query-only Q-Former pass reads: `query_tokens`, `ln_vision` (our
`vision_model/post_layernorm`), the Q-Former's input LayerNorm (`qformer/layernorm`, HF's
`embeddings.LayerNorm`) and, in every layer group `qformer/encoder/{layers,remainder}/layer_{j}`,
self-attention, cross-attention and the query FFN (`intermediate_query`, `output_query`). It
drops the text side (the top-level `embeddings`, each layer's `intermediate`/`output`, the LM
head `cls`) and the retrieval heads (`vision_projection`, `text_projection`, `itm_head`,
`temp`). `language_projection`, the ViT and the LLM stay as stage 2 had them (fresh, or from
their own checkpoint): the stage-1 ViT is the same frozen tower and is not copied again.
"""
from __future__ import annotations

import os
import re
from typing import Any

import numpy as np
from flax import traverse_util

from blip2_jax.models import blip2
from blip2_jax.weights.hf_names import CheckpointMismatchError
from blip2_jax.weights.model_checkpoint import CheckpointParams

Tree = Any

# The leaves of a stage-2 tree that come from stage 1.
_QUERY_PATH = re.compile(r"^(query_tokens|vision_model/post_layernorm/.+|qformer/layernorm/.+|"
                         r"qformer/encoder/(layers|remainder)/layer_\d+/(attention|crossattention|intermediate_query|"
                         r"output_query)/.+)$")


def is_query_path(path: str) -> bool:
    """Whether the '/'-joined parameter `path` is one stage 2 takes from stage 1."""
    return _QUERY_PATH.match(path) is not None


def stage2_from_stage1(stage1_params: Tree, stage2_params: Tree) -> Tree:
    """`stage2_params` with its query path and `ln_vision` replaced by the stage-1 values (cast to
    the stage-2 dtypes); every other leaf is passed through untouched. Raises
    `CheckpointMismatchError` listing every needed leaf stage 1 lacks or holds in another shape."""
    source = traverse_util.flatten_dict(stage1_params, sep="/")
    target = traverse_util.flatten_dict(stage2_params, sep="/")
    wanted = [p for p in target if is_query_path(p)]
    if not wanted:
        raise CheckpointMismatchError("the stage-2 tree has no Q-Former query path to initialise")
    problems = []
    for path in wanted:
        expected = tuple(target[path].shape)
        if path not in source:
            problems.append(f"{path}: missing from the stage-1 parameters (stage 2 expects shape {expected})")
        elif tuple(source[path].shape) != expected:
            problems.append(f"{path}: stage-2 expects shape {expected}, stage 1 has {tuple(source[path].shape)}")
    if problems:
        raise CheckpointMismatchError("stage-1 parameters do not fit the stage-2 model:\n  " + "\n  ".join(problems))
    out = dict(target)
    out.update({p: np.asarray(source[p], dtype=target[p].dtype) for p in wanted})
    return traverse_util.unflatten_dict(out, sep="/")


def load_stage1(path: str | os.PathLike, step: int | None = None) -> Tree:
    """The full stage-1 parameter tree (trainable + frozen, host arrays) of a stage-1 training run
    (its workdir: the latest complete checkpoint, or `step`; or one of its `checkpoints/<step>`
    directories) or of a stage-1 model checkpoint (`blip2-jax convert from-lavis`/`from-hf`)."""
    source = CheckpointParams.open(path, step)
    if not issubclass(blip2.ARCHITECTURES[source.architecture], blip2.Blip2ForImageTextRetrieval):
        raise CheckpointMismatchError(f"{source.source} is a {source.architecture}, not a stage-1 model")
    return source.tree()
