"""Orbax checkpoints of a run: `workdir/checkpoints/<step>/{state, data, metadata}` every N steps
(async, keep-N), and the frozen towers once in `workdir/frozen` (design decision 9).

Periodic saves hold only what changes: the trainable parameters, their optimizer state, the step
and RNG key, and the data iterator's position. Orbax finalises a step directory atomically, so a
run killed mid-save resumes from the last complete checkpoint; one damaged after it was finalised
(a truncated or deleted file) is skipped on resume with a warning and moved to
`workdir/checkpoints_unreadable/<step>-<time>`, and the newest step that restores is used. Closing waits
for the save in flight and removes any unfinished step directory, so no exit leaves one behind.

The frozen towers are written to a temporary directory with `fingerprint.json` (what decided their
values, `train/resume.py`) and renamed into place, so `frozen/` is either complete or absent.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from blip2_jax.errors import UserError
from blip2_jax.train.resume import differences

FINGERPRINT = "fingerprint.json"


class CheckpointError(UserError):
    """A workdir whose checkpoints cannot be resumed (none readable, or frozen towers that differ)."""


class Checkpointer:
    """Saves and restores a run's train state, data-iterator state and metadata."""

    def __init__(self, workdir: str | Path, *, save_every: int, keep: int = 3, async_save: bool = True,
                 owner: bool = False):
        """`owner`: this is the run that writes `workdir` (it holds its lock, `train/lock.py`), so
        unfinished step directories are its own to remove and unreadable steps its own to move.
        A reader (export, evaluation, `init.*` from a live run's workdir) must not touch them."""
        self.workdir = epath.Path(workdir)
        self.owner = owner
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every,
                                               enable_async_checkpointing=async_save, create=True,
                                               cleanup_tmp_directories=owner)
        self.manager = ocp.CheckpointManager(self.workdir / "checkpoints", options=options,
                                             item_names=("state", "data", "metadata"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        """The steps with a complete checkpoint, oldest first."""
        return sorted(self.manager.all_steps())

    def metadata(self, step: int) -> dict:
        """What `save` stored beside `step`'s state: the run's config (JSON), frozen source, counters."""
        return self.manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]

    def state_dir(self, step: int) -> epath.Path:
        """The Orbax pytree of `step`'s train state, for readers of single leaves (its `params` subtree
        holds the trained parameters)."""
        return self.workdir / "checkpoints" / str(step) / "state"

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

    def restore_newest_readable(self, abstract_state: Any, check: Callable[[dict], None]
                                ) -> tuple[Any, dict, dict]:
        """Like `restore()` at the newest step that restores. `check(metadata)` runs on each step's
        metadata first and raises to refuse the workdir (a changed config is not a damaged step).
        Steps that fail to read are logged, skipped and (by the owner's process 0) moved out of
        `checkpoints/`, so the run rewrites them and keep-N counts only readable ones."""
        skipped = []
        for step in reversed(self.steps()):
            try:
                metadata = self.metadata(step)
            except Exception as e:  # pylint: disable=broad-except  # any unreadable file: try an older step
                skipped.append((step, e))
                continue
            check(metadata)
            try:
                restored = self.restore(abstract_state, step)
            except Exception as e:  # pylint: disable=broad-except
                skipped.append((step, e))
                continue
            self._set_aside(skipped)
            return restored
        reasons = "; ".join(f"step {s}: {type(e).__name__}: {str(e)[:200]}" for s, e in skipped)
        raise CheckpointError(f"no readable checkpoint in {self.workdir / 'checkpoints'} ({reasons})")

    def _set_aside(self, skipped: list[tuple[int, Exception]]) -> None:
        for step, error in skipped:
            logging.warning("skipped checkpoint step %d in %s: %s: %s", step, self.workdir / "checkpoints",
                            type(error).__name__, str(error)[:500])
        if not (skipped and self.owner):
            return
        if jax.process_index() == 0:
            aside = Path(self.workdir / "checkpoints_unreadable")
            aside.mkdir(exist_ok=True)
            for step, _ in skipped:
                target = aside / f"{step}-{time.strftime('%Y%m%dT%H%M%S')}"
                os.replace(Path(self.workdir / "checkpoints" / str(step)), target)
                logging.warning("moved the unreadable step %d to %s", step, target)
        multihost_utils.sync_global_devices("unreadable steps set aside")
        self.manager.reload()

    def restore_arrays(self, step: int | None = None) -> Any:
        """The saved train state as host arrays, without a target tree (inspection, export)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.workdir / 'checkpoints'}")
        return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]

    @property
    def frozen_dir(self) -> epath.Path:
        return self.workdir / "frozen"

    def frozen_fingerprint(self) -> dict | None:
        """The stored fingerprint of `frozen/`, or None (absent, or written before fingerprints)."""
        path = self.frozen_dir / FINGERPRINT
        return json.loads(path.read_text()) if path.exists() else None

    def save_frozen(self, frozen: Any, fingerprint: dict) -> None:
        """Write the frozen towers of a fresh run (they never change during it), replacing a
        `frozen/` left by an earlier attempt from other weights. A run with nothing frozen
        (retrieval fine-tuning) writes no `frozen` directory: Orbax refuses an empty tree."""
        if not jax.tree.leaves(frozen):
            return
        if self.frozen_dir.exists():
            if self.frozen_fingerprint() == fingerprint:
                return  # the same towers: an earlier attempt died before its first checkpoint
            logging.warning("replacing %s: it holds frozen towers from other weights or init", self.frozen_dir)
        tmp = self.workdir / "frozen.tmp"  # one name: every process of a multi-host run writes its shards there
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(tmp, frozen, force=True)
            checkpointer.wait_until_finished()
        if jax.process_index() == 0:
            (tmp / FINGERPRINT).write_text(json.dumps(fingerprint, indent=1, sort_keys=True))
            if self.frozen_dir.exists():
                shutil.rmtree(self.frozen_dir)
            os.replace(Path(tmp), Path(self.frozen_dir))
        multihost_utils.sync_global_devices("frozen towers in place")

    def restore_frozen(self, abstract_frozen: Any, fingerprint: dict) -> Any:
        """The frozen towers, after checking they come from the weights this run starts from."""
        if not jax.tree.leaves(abstract_frozen):
            return abstract_frozen  # nothing frozen, nothing saved
        stored = self.frozen_fingerprint()
        if stored is None:
            logging.warning("%s has no %s (written by an older version): its source is not checked",
                            self.frozen_dir, FINGERPRINT)
        elif stored != fingerprint:
            raise CheckpointError(f"{self.frozen_dir} holds frozen towers from other weights than this run's "
                                  f"(stored -> this run): {'; '.join(differences(stored, fingerprint))}")
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(self.frozen_dir, abstract_frozen)

    def close(self) -> None:
        """Finish the save in flight, remove unfinished step directories (owner), release Orbax's threads."""
        self.manager.wait_until_finished()
        if self.owner and jax.process_index() == 0:
            for tmp in Path(self.workdir / "checkpoints").glob("*.orbax-checkpoint-tmp*"):
                shutil.rmtree(tmp, ignore_errors=True)
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a tree of arrays, the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
