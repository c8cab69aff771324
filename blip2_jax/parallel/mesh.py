"""One device mesh `('data', 'fsdp', 'tensor')` and the logical-to-mesh axis rules.

Every parameter carries logical axis names (models/layers.py); rules map them onto mesh axes
(design decision 4). The rules are config data (`config.mesh.rules`, `DEFAULT_RULES` the default):
logical axis -> comma-separated mesh axes, "" for replicated. A dimension whose size the mapped
mesh axes do not divide is replicated over them instead (tiny test models, odd vocabularies), so
the same rules serve every model size; `replicated_report` lists each such parameter with what it
costs per device, and the trainer refuses one that costs more than `config.mesh.max_replicated_mib`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from blip2_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# The parameters' logical axes -> mesh axes ("" = replicated; "fsdp,tensor" = over both): shard over
# fsdp (embed) and tensor (heads, mlp, vocab). Every logical axis a parameter has is a key. Where two
# axes of one parameter map to the same mesh axis, the one listed first here gets it (configs sort
# their keys, so this order, not theirs, decides). The batch of the data is sharded over data x fsdp
# (`batch_sharding`), whatever the rules.
DEFAULT_RULES: dict[str, str] = dict(embed="fsdp", heads="tensor", mlp="tensor", vocab="tensor", layers="",
                                     norm="", relpos_buckets="")
Rules = tuple[tuple[str, Any], ...]  # flax's form: (logical, mesh axis | tuple of them | None)


def parse_rules(rules: Mapping[str, str | None]) -> Rules:
    """`{'embed': 'fsdp', 'mlp': 'tensor', 'norm': ''}` -> flax's rule tuples, every name checked."""
    unknown = sorted(set(rules) - set(DEFAULT_RULES))
    if unknown:
        raise UserError(f"config.mesh.rules.{unknown[0]}: not a logical axis of the parameters; they are "
                        f"{list(DEFAULT_RULES)}")
    parsed = []
    for logical in DEFAULT_RULES:
        text = rules.get(logical, DEFAULT_RULES[logical])
        axes = tuple(a.strip() for a in (text or "").split(",") if a.strip())
        if any(a not in MESH_AXES for a in axes) or len(set(axes)) != len(axes):
            raise UserError(f"config.mesh.rules.{logical}={text!r}: expected distinct mesh axes from {MESH_AXES}, "
                            "comma-separated, or '' to replicate")
        parsed.append((logical, axes[0] if len(axes) == 1 else (axes or None)))
    return tuple(parsed)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default: all, across hosts); `data=-1` takes what is left."""
    devices = list(jax.devices() if devices is None else devices)
    if data == -1:
        if len(devices) % (fsdp * tensor):
            raise ValueError(f"{len(devices)} devices are not divisible by fsdp*tensor = {fsdp * tensor}")
        data = len(devices) // (fsdp * tensor)
    if data * fsdp * tensor != len(devices):
        raise ValueError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} = {data * fsdp * tensor} "
                         f"does not match the {len(devices)} devices")
    try:  # topology-aware placement where the platform supports it
        grid = mesh_utils.create_device_mesh((data, fsdp, tensor), devices)
    except (AttributeError, ValueError, NotImplementedError):
        grid = np.array(devices).reshape(data, fsdp, tensor)
    return Mesh(grid, MESH_AXES)


def _axes(entry: Any) -> tuple[str, ...]:
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def _padded(spec: P, ndim: int) -> tuple[Any, ...]:
    return tuple(spec) + (None,) * (ndim - len(spec))


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Replicate every dimension the mapped mesh axes do not divide evenly."""
    return P(*(axes if dim % math.prod(mesh.shape[a] for a in _axes(axes)) == 0 else None
               for dim, axes in zip(shape, _padded(spec, len(shape)))))


def _mesh_specs(boxed: Any, rules: Sequence[tuple[str, Any]]) -> Any:
    return nn.logical_to_mesh(nn.get_partition_spec(boxed), rules)


def _is_spec(x: Any) -> bool:
    return isinstance(x, P)


def logical_shardings(boxed: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = parse_rules(DEFAULT_RULES)) -> Any:
    """NamedShardings for a tree of `nn.Partitioned` leaves (or their `jax.ShapeDtypeStruct`s)."""
    return jax.tree.map(lambda spec, leaf: NamedSharding(mesh, _fit(spec, tuple(leaf.shape), mesh)),
                        _mesh_specs(boxed, rules), nn.unbox(boxed), is_leaf=_is_spec)


@dataclasses.dataclass(frozen=True)
class Replicated:
    """A parameter a rule shards along a dimension the mesh does not divide: that dimension is
    replicated instead, so every device holds `extra_bytes` more than the rule meant."""

    path: str
    shape: tuple[int, ...]
    dims: tuple[tuple[int, str, str], ...]  # (dimension, logical axis, "fsdp=4") of each replicated one
    extra_bytes: int

    def describe(self) -> str:
        dims = ", ".join(f"dim {d} ({logical}) {self.shape[d]} over {axes}" for d, logical, axes in self.dims)
        return f"{self.path} {list(self.shape)}: {dims} does not divide, +{self.extra_bytes / 2**20:.2f} MiB per device"


def replicated_report(boxed: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> list[Replicated]:
    """Every parameter of `boxed` that `logical_shardings` replicates against its rule, largest first."""
    logical = jax.tree_util.tree_flatten_with_path(nn.get_partition_spec(boxed), is_leaf=_is_spec)[0]
    specs = jax.tree.leaves(_mesh_specs(boxed, rules), is_leaf=_is_spec)
    report = []
    for (path, names), spec, leaf in zip(logical, specs, jax.tree.leaves(nn.unbox(boxed))):
        shape = tuple(leaf.shape)
        meant, fitted = _padded(spec, len(shape)), _fit(spec, shape, mesh)
        dims = tuple((d, names[d], ",".join(f"{a}={mesh.shape[a]}" for a in _axes(meant[d])))
                     for d in range(len(shape)) if meant[d] is not None and fitted[d] is None)
        if dims:
            nbytes = math.prod(shape) * np.dtype(leaf.dtype).itemsize
            shards = [math.prod(mesh.shape[a] for entry in s for a in _axes(entry)) for s in (fitted, meant)]
            report.append(Replicated(jax.tree_util.keystr(path, simple=True, separator="/"), shape, dims,
                                     nbytes // shards[0] - nbytes // shards[1]))
    return sorted(report, key=lambda r: -r.extra_bytes)


def check_replicated(report: Sequence[Replicated], limit_mib: float) -> None:
    """Refuse a mesh on which one parameter's unmet rule costs more than `limit_mib` per device."""
    over = [r for r in report if r.extra_bytes > limit_mib * 2**20]
    if over:
        raise UserError(f"{len(over)} parameter(s) replicated because the mesh does not divide them, past "
                        f"config.mesh.max_replicated_mib={limit_mib:g}; the largest: {over[0].describe()}.\n"
                        "Pick mesh sizes that divide it, change config.mesh.rules, or raise the limit")


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Shard the leading (batch) dimension over data x fsdp; replicate the rest."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
