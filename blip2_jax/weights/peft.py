"""Our LoRA adapters (`models/lora.py`) <-> Hugging Face PEFT adapter directories.

A PEFT LoRA directory holds `adapter_config.json` and `adapter_model.safetensors`, whose tensors are
named after the transformers module they adapt: `base_model.model.<module>.lora_A.weight` (r, d_in)
and `...lora_B.weight` (d_out, r); `PeftModel.from_pretrained(model, directory)` puts them on the
model `to-hf` writes. The module names are our kernels' Hugging Face names (`hf_names.slots`)
without `.weight`, so every layout rule of the weights (scanned stacks, Q-Former groups, T5 blocks)
carries over. What a LoRA config can say beyond rank, alpha, dropout and targets (DoRA, rsLoRA,
per-module ranks, `modules_to_save`, adapters on some layers of a scanned stack) is refused on
import, with the setting named.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from blip2_jax.errors import InputNotFound, UserError
from blip2_jax.models import lora
from blip2_jax.weights import hf_names, safetensors_io

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
_PEFT_KEY = re.compile(rf"^{re.escape(PREFIX)}(.+)\.lora_([AB])\.weight$")


def layer_modules(shapes: Mapping[str, tuple[int, ...]], qformer_group: int) -> dict[str, list[tuple[str, int | None]]]:
    """Our adapted dense layer -> [(its transformers module name, stacked index or None)] for a
    flat tree of shapes; with no adapter in `shapes`, every dense layer's."""
    base = {p: s for p, s in shapes.items() if not lora.is_adapter_leaf(p)}
    adapted = {p[: -len(lora.A) - 1] for p in shapes if p.endswith("/" + lora.A)}
    out: dict[str, list[tuple[str, int | None]]] = {}
    for name, slot in hf_names.slots(base, qformer_group=qformer_group).items():
        layer = slot.path[: -len("/kernel")]
        if slot.path.endswith("/kernel") and (layer in adapted or not adapted) and name.endswith(".weight"):
            out.setdefault(layer, []).append((name[: -len(".weight")], slot.index))
    return out


def adapter_config(rank: int, scaling: float, dropout: float, modules: list[str], base: str) -> dict[str, Any]:
    """The `adapter_config.json` PEFT's `LoraConfig` reads for these settings (what it omits takes
    PEFT's defaults: no DoRA, no rsLoRA, no bias)."""
    return {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base, "r": rank,
            "lora_alpha": scaling * rank, "lora_dropout": dropout, "target_modules": sorted(modules),
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
            "init_lora_weights": True}


def write_adapter(directory: Path, leaves: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                  read: Callable[[list[str]], dict], *, qformer_group: int, base: str, dtype: Any = None) -> None:
    """A PEFT adapter directory from the adapters of a flat tree (`leaves`: path -> (shape, dtype)),
    reading one layer's leaves at a time with `read(paths) -> {path: array}`; `dtype`: of the
    tensors written (default: the adapters')."""
    shapes = {p: s for p, (s, _) in leaves.items()}
    modules = layer_modules(shapes, qformer_group)
    constants = read([f"{layer}/{k}" for layer in modules for k in lora.CONSTANTS])
    rank, scaling, dropout = lora.settings(shapes, constants, modules)
    plan, where = [], {}
    for layer, entries in modules.items():
        a_shape = shapes[f"{layer}/{lora.A}"]
        d_in, d_out = a_shape[-2], shapes[f"{layer}/{lora.B}"][-1]
        for module, index in entries:
            for part, shape in (("A", (rank, d_in)), ("B", (d_out, rank))):
                key = f"{PREFIX}{module}.lora_{part}.weight"
                plan.append((key, shape, np.dtype(dtype if dtype is not None else leaves[f"{layer}/{lora.A}"][1])))
                where[key] = (layer, index, part)
    plan_dtype = {k: d for k, _, d in plan}
    cache: dict[str, dict] = {}

    def produce(key: str) -> np.ndarray:
        layer, index, part = where[key]
        if layer not in cache:
            cache.clear()  # one layer's adapters in memory at a time
            cache[layer] = read([f"{layer}/{lora.A}", f"{layer}/{lora.B}"])
        leaf = np.asarray(cache[layer][f"{layer}/{lora.A if part == 'A' else lora.B}"])
        value = leaf if index is None else leaf[index]
        return np.ascontiguousarray(value.T).astype(plan_dtype[key])

    directory.mkdir(parents=True, exist_ok=True)
    safetensors_io.write_file(directory / ADAPTER_WEIGHTS, plan, produce)
    (directory / ADAPTER_CONFIG).write_text(json.dumps(
        adapter_config(rank, scaling, dropout, [m for entries in modules.values() for m, _ in entries], base),
        indent=2))


_REFUSED = (("use_dora", "DoRA"), ("use_rslora", "rsLoRA (scaling alpha/sqrt(r))"),
            ("rank_pattern", "per-module ranks"), ("alpha_pattern", "per-module alphas"),
            ("modules_to_save", "modules_to_save (full copies of modules)"),
            ("layers_to_transform", "layers_to_transform"), ("fan_in_fan_out", "fan_in_fan_out (Conv1D weights)"))


def read_adapter(directory: str | Path, shapes: Mapping[str, tuple[int, ...]], *, qformer_group: int
                 ) -> tuple[lora.LoraConfig, dict[str, np.ndarray]]:
    """(the LoRA config, our adapter leaves) of the PEFT adapter `directory` for the base model whose
    flat tree of shapes is `shapes`; everything is checked before a tensor is read."""
    directory = Path(directory)
    file = directory / ADAPTER_CONFIG
    if not file.is_file():
        raise InputNotFound(f"{file} not found: a PEFT adapter directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    config = json.loads(file.read_text())
    if config.get("peft_type") != "LORA":
        raise UserError(f"{file}: peft_type is {config.get('peft_type')!r}; only LORA adapters are read")
    refused = [what for key, what in _REFUSED if config.get(key)]
    if config.get("bias", "none") != "none":
        refused.append(f"bias={config['bias']!r}")
    if refused:
        raise UserError(f"{file}: {', '.join(refused)} cannot be expressed as blip2_jax LoRA (rank, alpha, "
                        "dropout, targets)")
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    tensors = safetensors_io.SafetensorsFiles([directory / ADAPTER_WEIGHTS])
    modules = {m: (layer, index) for layer, entries in layer_modules(shapes, qformer_group).items()
               for m, index in entries}
    found: dict[str, dict[int | None, dict[str, str]]] = {}
    unknown = []
    for key in tensors:
        m = _PEFT_KEY.match(key)
        if m is None or m.group(1) not in modules:
            unknown.append(key)
            continue
        layer, index = modules[m.group(1)]
        found.setdefault(layer, {}).setdefault(index, {})[m.group(2)] = key
    problems = [f"tensors of no dense layer of the model: {sorted(unknown)[:4]}"] if unknown else []
    leaves: dict[str, np.ndarray] = {}
    for layer, by_index in sorted(found.items()):
        kernel = shapes[f"{layer}/kernel"]
        lead, (d_in, d_out) = kernel[:-2], kernel[-2:]
        want = set(range(lead[0])) if lead else {None}
        if set(by_index) != want or any(len(parts) != 2 for parts in by_index.values()):
            problems.append(f"{layer}: adapters (lora_A and lora_B) must cover every layer of the stack; found "
                            f"{sorted(by_index, key=str)} of {lead[0] if lead else 1}")
            continue
        a, b = np.empty((*lead, d_in, rank), np.float32), np.empty((*lead, rank, d_out), np.float32)
        for index, parts in by_index.items():
            at = () if index is None else (index,)
            for part, leaf, shape in (("A", a, (rank, d_in)), ("B", b, (d_out, rank))):
                if tuple(tensors.shape(parts[part])) != shape:
                    problems.append(f"{parts[part]}: shape {tuple(tensors.shape(parts[part]))}, expected {shape}")
                    continue
                leaf[at] = hf_names.finite(parts[part], hf_names.to_numpy(tensors[parts[part]]), str(directory)).T
        leaves.update({f"{layer}/{lora.A}": a, f"{layer}/{lora.B}": b,
                       f"{layer}/{lora.SCALING}": np.full(lead, alpha / rank, np.float32),
                       f"{layer}/{lora.DROPOUT}": np.full(lead, float(config.get("lora_dropout", 0.0)), np.float32)})
    if not found and not problems:
        problems.append(f"no lora_A/lora_B tensor in {directory / ADAPTER_WEIGHTS}")
    if problems:
        raise UserError(f"{directory} does not fit the model:\n  " + "\n  ".join(problems))
    targets = tuple(f"^{re.escape(layer)}$" for layer in sorted(found))
    return lora.LoraConfig(rank=rank, alpha=alpha, dropout=float(config.get("lora_dropout", 0.0)),
                           targets=targets), leaves
