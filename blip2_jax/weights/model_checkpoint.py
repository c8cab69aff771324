"""Orbax model checkpoints, and one reader for every place whole-model parameters live.

A model checkpoint (what `blip2-jax convert from-hf/from-lavis` write) is a directory:

    params/          the parameter tree, an Orbax checkpoint written a group of leaves at a time
    blip2_jax.json   {"architecture": ..., "config": <our model config, presets.to_config_dict>, "source": ...}
    tokenizer files  the source's tokenizer / processor files, when it had them

`CheckpointParams.open` reads that, a training workdir (the trainable tree of a step's
train state plus the frozen towers saved once, design decision 9) or one of its
`checkpoints/<step>` directories, and gives the architecture, the model config, the leaf
shapes and the leaves, read a few at a time so an export never holds the whole model.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from blip2_jax.data.tokenizers import TOKENIZER_FILES
from blip2_jax.errors import InputNotFound, OutputExists
from blip2_jax.models import blip2, presets
from blip2_jax.models import config as config_lib
from blip2_jax.weights.hf_names import CheckpointMismatchError, finite

Tree = Any
METADATA = "blip2_jax.json"
PARAMS = "params"
_TOKENIZER_MARKERS = TOKENIZER_FILES + ("vocab.txt",)  # an LLM's tokenizer, or the Q-Former's BERT vocabulary
_GROUP_BYTES = 512 << 20  # leaves per Orbax partial save: bounds memory, keeps the number of saves small


def absolute(path: str | os.PathLike) -> str:
    """`path` as Orbax needs it: a local path made absolute ("Checkpoint path should be absolute"
    otherwise); a URL (gs://...) as given."""
    path = os.fspath(path)
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def abstract_params(architecture: str, config: config_lib.Blip2Config) -> Tree:
    """The parameter shapes a checkpoint of `architecture` (a `blip2.ARCHITECTURES` name) holds."""
    return blip2.abstract_params(config, model=blip2.build(config, architecture))


def _restore(directory: epath.Path, paths: Iterable[str] | None = None,
             args: Callable[[str], ocp.RestoreArgs] | None = None) -> dict[str, Any]:
    """'/'-joined path -> array for the leaves `paths` (default all) of an Orbax pytree: host arrays,
    or what `args(path)` asks for (an `ArrayRestoreArgs` with a sharding reads only the shards, at
    most 1 GB of them in flight: Orbax's default lets the reads of a whole model overlap)."""
    handler = ocp.PyTreeCheckpointHandler(restore_concurrent_gb=None if args is None else 1)
    try:
        flat = traverse_util.flatten_dict(handler.metadata(directory).tree, sep="/")
        wanted = list(flat) if paths is None else list(paths)
        item = traverse_util.unflatten_dict({p: flat[p] for p in wanted}, sep="/")
        restore_args = traverse_util.unflatten_dict(
            {p: ocp.RestoreArgs(restore_type=np.ndarray) if args is None else args(p) for p in wanted}, sep="/")
        out = handler.restore(directory, args=ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args, partial_restore=paths is not None))
    finally:
        handler.close()
    return traverse_util.flatten_dict(out, sep="/")


def _leaf_metadata(directory: epath.Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    handler = ocp.PyTreeCheckpointHandler()
    try:
        flat = traverse_util.flatten_dict(handler.metadata(directory).tree, sep="/")
    finally:
        handler.close()
    # a train state also holds optimizer containers (lists, empty nodes) beside the arrays
    return {p: (tuple(m.shape), np.dtype(m.dtype)) for p, m in flat.items() if hasattr(m, "shape")}


class CheckpointParams:
    """A checkpoint's architecture, config and parameters (`open` says which layouts it reads)."""

    def __init__(self, architecture: str, config: config_lib.Blip2Config, trees: list[tuple[epath.Path, str]],
                 *, source: str, tokenizer: str = ""):
        """`trees`: (Orbax pytree directory, the subtree of it that holds parameters, "" for all)."""
        self.architecture, self.config, self.source, self.tokenizer = architecture, config, source, tokenizer
        self._where: dict[str, tuple[epath.Path, str]] = {}
        self.shapes: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        for directory, subtree in trees:
            inner = subtree + "/" if subtree else ""
            for path, meta in _leaf_metadata(directory).items():
                if path.startswith(inner):
                    self._where[path[len(inner):]], self.shapes[path[len(inner):]] = (directory, inner), meta
        expected = {p: tuple(s.shape) for p, s in
                    traverse_util.flatten_dict(abstract_params(architecture, config), sep="/").items()}
        missing = sorted(set(expected) - set(self.shapes))
        unknown = sorted(set(self.shapes) - set(expected))
        wrong = sorted(f"{p}: {self.shapes[p][0]}, expected {expected[p]}" for p in set(expected) & set(self.shapes)
                       if self.shapes[p][0] != expected[p])
        if missing or unknown or wrong:
            raise CheckpointMismatchError(
                f"{source} does not match its {architecture} config: missing {missing[:10]}, unexpected "
                f"{unknown[:10]}, wrong shape {wrong[:10]}")

    @classmethod
    def open(cls, path: str | os.PathLike, step: int | None = None) -> CheckpointParams:
        """A model checkpoint directory, a training workdir (latest complete step, or `step`) or a
        workdir's `checkpoints/<step>` directory."""
        path = epath.Path(absolute(path))
        if (path / METADATA).exists():
            meta = json.loads((path / METADATA).read_text())
            try:
                architecture, config = meta["architecture"], meta["config"]
            except KeyError as e:
                raise ValueError(f"{path / METADATA} lacks {e}: not a blip2_jax model checkpoint") from e
            tokenizer = str(path) if any((path / f).exists() for f in _TOKENIZER_MARKERS) else ""
            return cls(architecture, presets.from_config_dict(config), [(path / PARAMS / "state", "")],
                       source=str(path), tokenizer=tokenizer)
        if step is None and path.name.isdigit() and path.parent.name == "checkpoints":
            path, step = path.parent.parent, int(path.name)
        if not (path / "checkpoints").exists():
            raise InputNotFound(f"{path} is neither a model checkpoint (no {METADATA}) nor a training workdir "
                                "(no checkpoints/)")
        from blip2_jax.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel

        ckpt = Checkpointer(path, save_every=1, async_save=False)
        try:
            steps = ckpt.steps()
            step = ckpt.latest_step() if step is None else step
            if step not in steps:
                raise InputNotFound(f"no complete checkpoint{'' if step is None else f' at step {step}'} in "
                                    f"{path / 'checkpoints'} (complete steps: {steps})")
            meta, state_dir, frozen_dir = ckpt.metadata(step), ckpt.state_dir(step), ckpt.frozen_dir
        finally:
            ckpt.close()
        run = json.loads(meta["config"])
        config = presets.from_config_dict(run["model"])
        architecture = blip2.stage_architecture(run["stage"], config)
        # the train state holds `params` beside the optimizer state, step and RNG key
        trees = [(state_dir, "params")]
        if frozen_dir.exists():  # a run with nothing frozen has none
            trees.append((frozen_dir, ""))
        return cls(architecture, config, trees, source=f"{path} step {step}",
                   tokenizer=run.get("data", {}).get("tokenizer", ""))

    def read(self, paths: Iterable[str]) -> dict[str, np.ndarray]:
        """The leaves `paths` ('/'-joined) as host arrays."""
        by_tree: dict[tuple[epath.Path, str], list[str]] = {}
        for p in paths:
            by_tree.setdefault(self._where[p], []).append(p)
        out = {}
        for (directory, inner), group in by_tree.items():
            out.update({k[len(inner):]: finite(k[len(inner):], np.asarray(v), str(directory))
                        for k, v in _restore(directory, [inner + p for p in group]).items()})
        return out

    def tree(self) -> Tree:
        """The whole parameter tree as host arrays."""
        return traverse_util.unflatten_dict(self.read(self.shapes), sep="/")

    def read_sharded(self, shardings: dict[str, jax.sharding.Sharding],
                     dtypes: dict[str, np.dtype]) -> dict[str, jax.Array]:
        """Every leaf restored straight into its sharding and dtype (path -> ...): each device's shard
        is read from the checkpoint and nothing else, so no host copy of the model ever exists.
        Finiteness is checked shard by shard."""
        by_tree: dict[tuple[epath.Path, str], list[str]] = {}
        for p in self.shapes:
            by_tree.setdefault(self._where[p], []).append(p)
        out = {}
        for (directory, inner), group in by_tree.items():
            def args(path: str, inner: str = inner) -> ocp.ArrayRestoreArgs:
                leaf = path[len(inner):]
                return ocp.ArrayRestoreArgs(sharding=shardings[leaf], dtype=dtypes[leaf],
                                            global_shape=self.shapes[leaf][0])
            for k, v in _restore(directory, [inner + p for p in group], args).items():
                for shard in v.addressable_shards:
                    finite(k[len(inner):], np.asarray(shard.data), str(directory))
                out[k[len(inner):]] = v
        return out

    @property
    def nbytes(self) -> int:
        return sum(d.itemsize * int(np.prod(s, dtype=np.int64)) for s, d in self.shapes.values())


def temporary_sibling(out: Path) -> Path:
    """An empty directory beside `out` to build it in (renamed to `out` when complete)."""
    if out.exists():
        raise OutputExists(f"{out} exists; choose another --out or remove it")
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def write(out: str | os.PathLike, architecture: str, config: config_lib.Blip2Config,
          leaves: Iterator[tuple[str, np.ndarray]], *, source: str, copy_files: Iterable[Path] = (),
          progress: Callable[[int], None] | None = None, group_bytes: int = _GROUP_BYTES) -> Path:
    """Write a model checkpoint at `out` from ('/'-joined path, array) `leaves`, a group of at
    most `group_bytes` in memory at a time. Everything is written under a temporary sibling that
    is renamed to `out` only when complete: a failed conversion leaves nothing at `out`."""
    import orbax.checkpoint.experimental.v1 as ocp_v1  # pylint: disable=import-outside-toplevel

    out = Path(absolute(out))
    tmp = temporary_sibling(out)
    try:
        group: dict[str, np.ndarray] = {}
        size = 0

        # The save is synchronous, so Orbax need not copy the host arrays first; 64 MiB chunks keep
        # tensorstore's buffers small (a stacked leaf is written, not copied: peak ~ 1 x the leaf).
        context = ocp_v1.Context()
        context.memory.deepcopy_host_arrays = False
        context.array.saving.storage_options.chunk_byte_size = 64 << 20

        def flush():
            with context:
                ocp_v1.partial.save(tmp / PARAMS, traverse_util.unflatten_dict(group, sep="/"))
            if progress is not None:
                progress(size)

        for path, value in leaves:
            value = np.asarray(value)  # a 0-d leaf (temp) as an array, not a numpy scalar
            if group and size + value.nbytes > group_bytes:  # memory: one group or one leaf, never both
                flush()
                group, size = {}, 0
            group[path] = value
            size += value.nbytes
        if group:
            flush()
        with context:
            ocp_v1.partial.finalize(tmp / PARAMS)
        for file in copy_files:  # a directory (InstructBLIP's qformer_tokenizer/) with its files
            (shutil.copytree if file.is_dir() else shutil.copy)(file, tmp / file.name)
        (tmp / METADATA).write_text(json.dumps({"architecture": architecture,
                                                "config": presets.to_config_dict(config).to_dict(),
                                                "source": source}, indent=2))
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
