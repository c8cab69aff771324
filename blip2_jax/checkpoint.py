"""Orbax checkpoints of a run: `workdir/checkpoints/<step>/{state, data, metadata}` every N steps
(async, keep-N), and the frozen towers once in `workdir/frozen` (design decision 9).

Periodic saves hold only what changes: the trainable parameters, their optimizer state, the step
and RNG key, and the data iterator's position. Orbax finalises a step directory atomically, so a
run killed mid-save resumes from the last complete checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath


class Checkpointer:
    """Saves and restores a run's train state, data-iterator state and metadata."""

    def __init__(self, workdir: str | Path, *, save_every: int, keep: int = 3, async_save: bool = True):
        self.workdir = epath.Path(workdir)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every,
                                               enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.workdir / "checkpoints", options=options,
                                             item_names=("state", "data", "metadata"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, metadata: dict, *, force: bool = False) -> bool:
        """Save at `step` if the interval says so (or `force`); returns whether it saved."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                                  metadata=ocp.args.JsonSave(metadata))
        return self.manager.save(step, args=args, force=force)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, dict]:
        """(state, data_state, metadata) at `step` (default: the latest complete checkpoint),
        placed with the shardings of `abstract_state` (a tree of `jax.ShapeDtypeStruct`)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.workdir / 'checkpoints'}")
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                                  metadata=ocp.args.JsonRestore())
        out = self.manager.restore(step, args=args)
        return out["state"], out["data"], out["metadata"]

    def restore_arrays(self, step: int | None = None) -> Any:
        """The saved train state as host arrays, without a target tree (inspection, export)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.workdir / 'checkpoints'}")
        return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]

    @property
    def frozen_dir(self) -> epath.Path:
        return self.workdir / "frozen"

    def save_frozen(self, frozen: Any) -> None:
        """Write the frozen towers once (they never change during the run). A run with nothing
        frozen (retrieval fine-tuning) writes no `frozen` directory: Orbax refuses an empty tree."""
        if self.frozen_dir.exists() or not jax.tree.leaves(frozen):
            return
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(self.frozen_dir, frozen)
        checkpointer.wait_until_finished()

    def restore_frozen(self, abstract_frozen: Any) -> Any:
        if not jax.tree.leaves(abstract_frozen):
            return abstract_frozen  # nothing frozen, nothing saved
        return ocp.StandardCheckpointer().restore(self.frozen_dir, abstract_frozen)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a tree of arrays, the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
