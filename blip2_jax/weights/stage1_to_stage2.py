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

An InstructBLIP (instruction-aware) stage 2 reads the instruction through the Q-Former's text side,
so it also takes that from stage 1, as LAVIS's `blip2_*_instruct` load a BLIP-2 pre-training
checkpoint: the word and position embeddings (stage 1's top-level `embeddings`, here
`qformer/embeddings`), each layer's text FFN (`intermediate`, `output`), and the embeddings
LayerNorm, which InstructBLIP applies to queries and text alike (`qformer/embeddings/layernorm`,
stage 1's `qformer/layernorm`, part of the query path). With `text_side_only` (stage 2 already
holds a trained BLIP-2's query path, e.g. `init.checkpoint`), only the embeddings and text FFN.
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
_QUERY_PATH = re.compile(r"^(query_tokens|vision_model/post_layernorm/.+|qformer/(embeddings/)?layernorm/.+|"
                         r"qformer/encoder/(layers|remainder)/layer_\d+/(attention|crossattention|intermediate_query|"
                         r"output_query)/.+)$")


# InstructBLIP's Q-Former text side (its paths in stage 2), and where stage 1 keeps each part.
_TEXT_SIDE = re.compile(r"^qformer/(embeddings/(word|position)_embeddings/.+|"
                        r"encoder/(layers|remainder)/layer_\d+/(intermediate|output)/.+)$")
_STAGE1_NAMES = (("qformer/embeddings/layernorm/", "qformer/layernorm/"), ("qformer/embeddings/", "embeddings/"))


def is_query_path(path: str) -> bool:
    """Whether the '/'-joined parameter `path` is one stage 2 takes from stage 1."""
    return _QUERY_PATH.match(path) is not None


def is_text_side(path: str) -> bool:
    """Whether `path` is an InstructBLIP Q-Former leaf that reads the instruction (from stage 1 too)."""
    return _TEXT_SIDE.match(path) is not None


def stage1_name(path: str) -> str:
    """The stage-1 path of the stage-2 leaf `path`."""
    for ours, theirs in _STAGE1_NAMES:
        if path.startswith(ours):
            return theirs + path[len(ours):]
    return path


def stage2_from_stage1(stage1_params: Tree, stage2_params: Tree, *, text_side_only: bool = False) -> Tree:
    """`stage2_params` with its query path and `ln_vision` (and an InstructBLIP's text side; with
    `text_side_only`, that alone) replaced by the stage-1 values (cast to the stage-2 dtypes);
    every other leaf is passed through untouched. Raises `CheckpointMismatchError` listing every
    needed leaf stage 1 lacks or holds in another shape."""
    source = traverse_util.flatten_dict(stage1_params, sep="/")
    target = traverse_util.flatten_dict(stage2_params, sep="/")
    wanted = [p for p in target if is_text_side(p) or (not text_side_only and is_query_path(p))]
    if not wanted:
        part = "text side" if text_side_only else "query path"
        raise CheckpointMismatchError(f"the stage-2 tree has no Q-Former {part} to initialise")
    problems = []
    for path in wanted:
        expected, name = tuple(target[path].shape), stage1_name(path)
        if name not in source:
            problems.append(f"{name}: missing from the stage-1 parameters (stage 2 expects shape {expected})")
        elif tuple(source[name].shape) != expected:
            problems.append(f"{name}: stage-2 expects shape {expected}, stage 1 has {tuple(source[name].shape)}")
    if problems:
        raise CheckpointMismatchError("stage-1 parameters do not fit the stage-2 model:\n  " + "\n  ".join(problems))
    out = dict(target)
    out.update({p: np.asarray(source[stage1_name(p)], dtype=target[p].dtype) for p in wanted})
    return traverse_util.unflatten_dict(out, sep="/")


def load_stage1(path: str | os.PathLike, step: int | None = None) -> Tree:
    """The full stage-1 parameter tree (trainable + frozen, host arrays) of a stage-1 training run
    (its workdir: the latest complete checkpoint, or `step`; or one of its `checkpoints/<step>`
    directories) or of a stage-1 model checkpoint (`blip2-jax convert from-lavis`/`from-hf`)."""
    source = CheckpointParams.open(path, step)
    if not issubclass(blip2.ARCHITECTURES[source.architecture], blip2.Blip2ForImageTextRetrieval):
        raise CheckpointMismatchError(f"{source.source} is a {source.architecture}, not a stage-1 model")
    return source.tree()
