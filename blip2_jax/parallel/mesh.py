"""One device mesh `('data', 'fsdp', 'tensor')` and the logical-to-mesh axis rules.

Every parameter carries logical axis names (models/layers.py); the rules below map them onto
mesh axes (design decision 4). A dimension whose size the mesh axes do not divide is replicated
instead (tiny test models, odd vocabularies), so the same rules serve every model size.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axes (None = replicated). Parameters shard over fsdp (embed) and tensor
# (heads, mlp, vocab); activations' batch over data and fsdp.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("length", None),
    ("norm", None),
    ("relpos_buckets", None),
)


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


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Replicate every dimension the mapped mesh axes do not divide evenly."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[a] for a in names)
        fitted.append(axes if names and dim % size == 0 else None)
    return P(*fitted)


def logical_shardings(boxed: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
    """NamedShardings for a tree of `nn.Partitioned` leaves (or their `jax.ShapeDtypeStruct`s)."""
    specs = nn.get_partition_spec(boxed)
    mesh_specs = nn.logical_to_mesh(specs, rules)
    shapes = jax.tree.map(lambda x: tuple(x.shape), nn.unbox(boxed))
    return jax.tree.map(lambda spec, shape: NamedSharding(mesh, _fit(spec, shape, mesh)), mesh_specs, shapes,
                        is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Shard the leading (batch) dimension over data x fsdp; replicate the rest."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
