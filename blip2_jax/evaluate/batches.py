"""Evaluation batches over every device and host, and the arrays that cross the mesh.

A data set of N samples is read as ceil(N / B) global batches of B rows (B = a per-device
batch x the batch-axis devices). The last batch is padded with copies of its first row and a
mask that drops them from the results, so no sample is ever dropped or counted twice, whatever N, B or the
number of hosts. Each host reads only its own rows of every batch; the jitted functions return
replicated outputs, which every host can read whole.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh

from blip2_jax.parallel import mesh as mesh_lib


def batch_devices(mesh: Mesh) -> int:
    """Devices along the batch axes (data x fsdp): a global batch must be a multiple of this."""
    return int(np.prod([mesh.shape[a] for a in mesh_lib.BATCH_AXES]))


@dataclasses.dataclass(frozen=True)
class EvalBatches:
    """The global batches of `num_samples` samples, `global_batch` rows each."""

    num_samples: int
    global_batch: int

    @classmethod
    def for_mesh(cls, num_samples: int, per_device: int, mesh: Mesh) -> EvalBatches:
        """`per_device` rows on each batch-axis device. Every device then computes the same shapes
        on any mesh, so a sample's outputs are bit-identical on 1 device and on 8 (its position in
        a device's block is its index modulo `per_device` either way)."""
        if per_device < 1:
            raise ValueError(f"the per-device batch must be >= 1, got {per_device}")
        return cls(num_samples, per_device * batch_devices(mesh))

    def __len__(self) -> int:
        return -(-self.num_samples // self.global_batch)

    def rows(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """(sample index per row, valid mask) of global batch `batch`; padded rows repeat its first sample."""
        index = batch * self.global_batch + np.arange(self.global_batch)
        valid = index < self.num_samples
        return np.where(valid, index, batch * self.global_batch), valid

    def local_rows(self, batch: int) -> np.ndarray:
        """The sample indices this host reads for global batch `batch`."""
        per_host = self.global_batch // jax.process_count()
        start = jax.process_index() * per_host
        return self.rows(batch)[0][start:start + per_host]

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(valid mask of all rows, this host's sample indices) per batch."""
        for b in range(len(self)):
            yield self.rows(b)[1], self.local_rows(b)


def to_global(mesh: Mesh, local: dict[str, np.ndarray], global_rows: int) -> dict[str, jax.Array]:
    """This host's rows of a batch as global arrays sharded over the batch axes."""
    return {k: jax.make_array_from_process_local_data(mesh_lib.batch_sharding(mesh, v.ndim), v,
                                                      (global_rows, *v.shape[1:])) for k, v in local.items()}


def replicate(mesh: Mesh, tree: Any) -> Any:
    """Host arrays that every row needs (e.g. all text features), copied to every device."""
    return jax.device_put(tree, mesh_lib.replicated(mesh))


def jit_replicated(fn: Callable, mesh: Mesh, **kwargs) -> Callable:
    """`fn` jitted with replicated outputs; its inputs bring their shardings (`to_global`,
    `replicate`, parameters placed by `weights.load`)."""
    return jax.jit(fn, out_shardings=mesh_lib.replicated(mesh), **kwargs)


def map_batches(mesh: Mesh, count: int, per_device: int, inputs: Callable[[np.ndarray], dict[str, np.ndarray]],
                fn: Callable[[dict[str, jax.Array]], jax.Array]) -> np.ndarray:
    """`fn` (replicated output) over the global batches of `count` samples, each host giving its own
    rows (`inputs(its sample indices)`); the valid rows of every batch, in sample order."""
    batches, out = EvalBatches.for_mesh(count, per_device, mesh), []
    for valid, local in batches:
        out.append(np.asarray(fn(to_global(mesh, inputs(local), batches.global_batch)))[valid])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)
