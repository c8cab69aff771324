"""`blip2-jax plan`: compile a preset's real train step for a mesh ahead of time, from shapes
alone, and report per-device memory and FLOPs before a pod is booted.

The step is the one `blip2-jax train` runs (`layout.py`), lowered with `jax.ShapeDtypeStruct`s
that carry the run's shardings and compiled by XLA for the mesh, on simulated CPU devices when no
accelerators are at hand (no weights are allocated). Parameter, optimizer and frozen bytes per
device come from the shardings (each leaf's shard shape x its dtype); arguments, outputs and
temporaries from the compiled executable's memory analysis; FLOPs from the step's jaxpr (matrix
FLOPs of every scanned layer, as the trainer's MFU). CPU compiles do not model accelerator
fusion, so temporaries are an estimate; parameters and optimizer state are exact.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from blip2_jax.errors import UserError
from blip2_jax.parallel import mesh as mesh_lib
from blip2_jax.train.flops import matmul_flops
from blip2_jax.train.metrics import PEAK_FLOPS
from blip2_jax.train.layout import Layout, build_layout
from blip2_jax.train.validate import check_batch_divides

GIB = 1 << 30
MAX_SIMULATED_DEVICES = 64  # `blip2-jax plan` folds the data axis of larger meshes (`make_plan`)
# Memory per device (GiB) and peak FLOP/s (the trainer's MFU table) of the kinds `--device_kind` names.
DEVICES = {name: (gib, PEAK_FLOPS[kind]) for name, gib, kind in [
    ("v4", 32, "TPU v4"), ("v5e", 16, "TPU v5e"), ("v5p", 95, "TPU v5p"), ("h100", 80, "NVIDIA H100"),
    ("a100", 40, "NVIDIA A100")]}
# The paper's compute (spec §16): samples/s the published runs exceeded, for "would we beat it".
PAPER_SAMPLES_PER_S = {"stage1": 810.0, "stage2": 469.0}


def _size(n: int) -> str:
    return f"{n / GIB:9.3f} GiB" if n >= GIB // 10 else f"{n / (1 << 20):9.3f} MiB"


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded `ShapeDtypeStruct`s (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if isinstance(leaf.sharding, NamedSharding) else leaf.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-device bytes and step FLOPs of one (preset, mesh, batch)."""

    mesh: dict[str, int]
    batch_size: int
    params_bytes: int  # trainable parameters
    optimizer_bytes: int  # optimizer state (and step, RNG key)
    frozen_bytes: int
    batch_bytes: int
    argument_bytes: int  # from the compiled executable: everything passed in
    output_bytes: int
    alias_bytes: int  # outputs that reuse donated inputs
    temp_bytes: int  # activations and temporaries
    flops_per_step: float  # global
    compiled_devices: int = 0  # devices the step was compiled for, when fewer than the mesh's (folded)
    replicated: tuple[mesh_lib.Replicated, ...] = ()  # parameters the mesh does not divide as the rules mean

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def flops_per_sample(self) -> float:
        return self.flops_per_step / self.batch_size

    def fits(self, kind: str) -> bool:
        return self.peak_bytes <= DEVICES[kind][0] * GIB

    def mfu_to_match_paper(self, kind: str, stage: str) -> float:
        """The MFU on `kind` at which this mesh trains as many samples/s as the paper's runs."""
        devices = math.prod(self.mesh.values())
        return PAPER_SAMPLES_PER_S[stage] * self.flops_per_sample / (DEVICES[kind][1] * devices)

    def report(self, stage: str, device_kind: str | None = None) -> str:
        mesh = ", ".join(f"{k}={v}" for k, v in self.mesh.items())
        rows = [f"mesh {mesh} ({math.prod(self.mesh.values())} devices), global batch {self.batch_size}",
                "per device:",
                f"  trainable parameters    {_size(self.params_bytes)}",
                f"  optimizer state         {_size(self.optimizer_bytes)}",
                f"  frozen weights          {_size(self.frozen_bytes)}",
                f"  batch                   {_size(self.batch_bytes)}",
                f"  activations/temporaries {_size(self.temp_bytes)} (compiled for CPU: an estimate)",
                f"  peak                    {_size(self.peak_bytes)} (arguments + outputs - donated + temporaries)",
                f"FLOPs per step {self.flops_per_step:.3e}, per sample {self.flops_per_sample:.3e}"]
        if self.compiled_devices:
            rows.insert(1, f"(compiled for one data-parallel replica, {self.compiled_devices} devices at its share of "
                           "the batch: every replica holds and computes the same)")
        if self.replicated:
            extra = sum(r.extra_bytes for r in self.replicated)
            rows.append(f"replicated where config.mesh.rules shard but the mesh does not divide: "
                        f"{len(self.replicated)} parameters, {_size(extra).strip()} more per device")
            rows += [f"  {r.describe()}" for r in self.replicated[:5]]
        kinds = [device_kind] if device_kind else list(DEVICES)
        for kind in kinds:  # a run the paper reports no throughput for (instruction tuning, the LM) has no MFU bar
            paper = (f"; MFU {self.mfu_to_match_paper(kind, stage):.1%} matches the paper's "
                     f"{PAPER_SAMPLES_PER_S[stage]:.0f} samples/s") if stage in PAPER_SAMPLES_PER_S else ""
            fit = "fits" if self.fits(kind) else "does NOT fit"
            rows.append(f"  {kind:<5} {DEVICES[kind][0]:>3} GiB: {fit}{paper}")
        return "\n".join(rows)


def make_plan(config, mesh_axes: dict[str, int]) -> Plan:
    """Compile `config`'s train step for a mesh of `mesh_axes` over the first devices.

    A mesh with more devices than are visible (a v5e-256 on this CPU) is planned by folding its data
    axis: parameters and optimizer state are replicated over `data`, so one replica (fsdp x tensor
    devices) at batch / data holds exactly the per-device bytes of the whole mesh. Its temporaries
    and FLOPs then miss only what grows with the batch across replicas: stage 1's ITC similarity
    rows, (batch / devices) x batch x queries floats, and the data axis's gradient all-reduce."""
    devices = jax.devices()
    need = math.prod(mesh_axes.values())
    replicas = mesh_axes.get("data", 1)
    fold = need > len(devices) and replicas > 1 and need // replicas <= len(devices)
    if need > len(devices) and not fold:
        raise UserError(f"--mesh {mesh_axes} needs {need} devices, {len(devices)} are visible")
    check_batch_divides(config.batch_size, replicas, mesh_axes.get("fsdp", 1), "--mesh")
    if fold:
        one = config.copy_and_resolve_references()
        one.batch_size = config.batch_size // replicas
        plan = make_plan(one, {**mesh_axes, "data": 1})
        return dataclasses.replace(plan, mesh=dict(mesh_axes), batch_size=config.batch_size,
                                   flops_per_step=plan.flops_per_step * replicas, compiled_devices=need // replicas)
    mesh = mesh_lib.make_mesh(mesh_axes.get("data", 1), mesh_axes.get("fsdp", 1), mesh_axes.get("tensor", 1),
                              devices[:need])
    return compile_step(config, mesh).plan()


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    """The train step of a run compiled for its mesh from shapes alone: what `plan` reports on, and
    what `benchmarks/gpu_suite.py` then runs on real arrays (so prediction and measurement share one
    executable)."""

    layout: Layout
    step: Any  # the jitted step
    args: tuple[Any, Any, Any]  # (state, frozen, batch) as sharded ShapeDtypeStructs
    compiled: Any

    def flops(self) -> float:
        return matmul_flops(jax.make_jaxpr(self.step)(*self.args).jaxpr)

    def plan(self) -> Plan:
        memory = self.compiled.memory_analysis()
        state, frozen, batch = self.args
        return Plan(mesh=dict(self.layout.mesh.shape), batch_size=self.layout.config.batch_size,
                    params_bytes=per_device_bytes(state.params),
                    optimizer_bytes=per_device_bytes(state) - per_device_bytes(state.params),
                    frozen_bytes=per_device_bytes(frozen), batch_bytes=per_device_bytes(batch),
                    argument_bytes=memory.argument_size_in_bytes, output_bytes=memory.output_size_in_bytes,
                    alias_bytes=memory.alias_size_in_bytes, temp_bytes=memory.temp_size_in_bytes,
                    flops_per_step=self.flops(), replicated=self.layout.replicated)


def compile_step(config, mesh: Mesh) -> CompiledStep:
    """`config`'s train step lowered with sharded shapes and compiled for `mesh` (no arrays)."""
    layout = build_layout(config, mesh)
    batch = layout.batch_abstract()
    step = layout.step_fn({k: v.sharding for k, v in batch.items()})
    args = (layout.state_abstract, layout.frozen_abstract, batch)
    return CompiledStep(layout=layout, step=step, args=args, compiled=step.lower(*args).compile())


def parse_mesh(text: str) -> dict[str, int]:
    """'data=8,fsdp=4,tensor=1' -> {'data': 8, 'fsdp': 4, 'tensor': 1}."""
    out = {}
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        if name not in ("data", "fsdp", "tensor") or not value.isdigit() or int(value) < 1:
            raise UserError(f"--mesh takes data=D,fsdp=F,tensor=T with positive sizes; got {part!r} in {text!r}")
        out[name] = int(value)
    return {k: out.get(k, 1) for k in ("data", "fsdp", "tensor")}
