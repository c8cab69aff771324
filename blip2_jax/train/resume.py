"""What a resumed run must agree on with the run that wrote its workdir.

A checkpoint holds the trainable state and the data position; the frozen towers live once in
`workdir/frozen`. Resuming with another model, partition, seed, batch or data would silently
continue a different run, so the stored config is compared with the new one and every field that
changes the model or the batch stream is refused by name. Fields that only say how long to run,
how to log, checkpoint or shard, and the optimizer's hyperparameters (lowering the LR after a
divergence is the usual reason to resume), may change. The frozen towers carry a fingerprint of
where they came from, checked on every resume.
"""
from __future__ import annotations

import json
from typing import Any

import ml_collections

# Dotted config fields (or prefixes ending in '.') a resume may change: none of them alters the
# model, the frozen towers or the batches. The optimizer fields listed keep its state's structure.
RESUMABLE_CHANGES = ("total_steps", "log.", "checkpoint.", "nonfinite.", "mesh.", "distributed.", "data.workers",
                     "data.read_threads", "data.cache_images", "optim.lr", "optim.min_lr", "optim.warmup_lr",
                     "optim.warmup_steps", "optim.total_steps", "optim.b1", "optim.b2", "optim.eps",
                     "optim.weight_decay")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def _plain(config: ml_collections.ConfigDict | dict | str) -> dict:
    """A config as plain JSON values (tuples become lists), whether live, a dict or stored JSON."""
    if isinstance(config, ml_collections.ConfigDict):
        config = config.to_json()
    return json.loads(config) if isinstance(config, str) else json.loads(json.dumps(config))


def _resumable(field: str) -> bool:
    return any(field == f or (f.endswith(".") and field.startswith(f)) for f in RESUMABLE_CHANGES)


def differences(stored: dict, new: dict) -> list[str]:
    """'field: stored -> new' for every flattened field that differs between two plain dicts."""
    a, b = _flatten(stored), _flatten(new)

    def show(tree: dict, key: str) -> str:
        return repr(tree[key]) if key in tree else "(absent)"

    return [f"{k}: {show(a, k)} -> {show(b, k)}" for k in sorted(set(a) | set(b))
            if k not in a or k not in b or a[k] != b[k]]


def refused_changes(stored: ml_collections.ConfigDict | dict | str,
                    new: ml_collections.ConfigDict | dict | str) -> list[str]:
    """The changes from the stored config to `new` that a resume cannot accept ('field: old -> new')."""
    a, b = _flatten(_plain(stored)), _flatten(_plain(new))
    fields = [k for k in sorted(set(a) | set(b)) if not _resumable(k)]
    return differences({k: a[k] for k in fields if k in a}, {k: b[k] for k in fields if k in b})


def frozen_fingerprint(config: ml_collections.ConfigDict) -> dict:
    """What decides the frozen towers' values: the model, which of its parameters are frozen, the
    source of the starting weights (or the seed of a random init) and the storage dtype."""
    return _plain(dict(stage=config.stage, model=config.model.to_dict(), trainable=config.trainable,
                       init_hf=config.init.hf, init_checkpoint=config.init.checkpoint, seed=config.seed,
                       frozen_dtype=config.frozen_dtype))
