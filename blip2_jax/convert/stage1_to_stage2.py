"""Start stage 2 from a stage-1 run (spec §3.6), as LAVIS's `Blip2OPT`/`Blip2T5` load a
`Blip2Qformer` checkpoint.

Stage 2 keeps what the query-only Q-Former pass reads: `query_tokens`, `ln_vision` (our
`vision_model/post_layernorm`), the Q-Former's input LayerNorm (`qformer/layernorm`, HF's
`embeddings.LayerNorm`) and, in every scanned layer group `qformer/encoder/layers/layer_{j}`,
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

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from blip2_jax.checkpoint import Checkpointer
from blip2_jax.convert.hf import CheckpointMismatchError
from blip2_jax.train.partition import merge

Tree = Any

# The leaves of a stage-2 tree that come from stage 1.
_QUERY_PATH = re.compile(r"^(query_tokens|vision_model/post_layernorm/.+|qformer/layernorm/.+|"
                         r"qformer/encoder/layers/layer_\d+/(attention|crossattention|intermediate_query|"
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


def _numpy_restore(directory: epath.Path, keys: tuple[str, ...] | None = None) -> Tree:
    """An Orbax pytree as host numpy arrays (no device placement, any saved sharding), optionally
    only its top-level `keys` (the train state's `params`, not its optimizer state)."""
    handler = ocp.PyTreeCheckpointHandler()
    try:
        item = handler.metadata(directory).tree
        if keys is not None:
            item = {k: item[k] for k in keys}
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        return handler.restore(directory, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                                      partial_restore=keys is not None))
    finally:
        handler.close()


def load_stage1(path: str | os.PathLike, step: int | None = None) -> Tree:
    """The full stage-1 parameter tree (trainable + frozen, host arrays) of a stage-1 training run.

    `path` is the run's workdir (the latest complete checkpoint, or `step`) or one of its step
    directories `workdir/checkpoints/<step>` (that step).
    """
    path = epath.Path(path)
    if step is None and path.name.isdigit() and path.parent.name == "checkpoints":
        path, step = path.parent.parent, int(path.name)
    if not (path / "checkpoints").exists():
        raise FileNotFoundError(f"no stage-1 run at {path}: expected a training workdir with checkpoints/ "
                                "(or one of its checkpoints/<step> directories)")
    ckpt = Checkpointer(path, save_every=1, async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step not in ckpt.manager.all_steps():
            at = "" if step is None else f" at step {step}"
            raise FileNotFoundError(f"no complete checkpoint{at} in {path / 'checkpoints'}")
        trainable = _numpy_restore(path / "checkpoints" / str(step) / "state", keys=("params",))["params"]
        frozen = _numpy_restore(ckpt.frozen_dir)
    finally:
        ckpt.close()
    return merge(trainable, frozen)
