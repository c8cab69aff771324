"""`blip2-jax convert from-lavis|to-lavis`: Salesforce LAVIS checkpoints (`blip2_pretrained.pth`,
the stage-2 OPT/FlanT5 `.pth` files, `eva_vit_g.pth`) <-> our model checkpoints, through the
Hugging Face names (`weights/lavis_names.py`, spec §12).

LAVIS saves only trainable parameters (spec §9.3), so its stage checkpoints lack the frozen
towers: the ViT comes from `eva_vit_g.pth` (`--vision`) and the LLM from its Hugging Face
directory (`--text`), as LAVIS itself builds them. On export the zero key slice of `qkv.bias` is
dropped (a nonzero one shifts all of a query's scores by one constant, which softmax ignores; it
is reported).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

from blip2_jax.models import config as config_lib
from blip2_jax.weights import hf_names
from blip2_jax.weights import model_checkpoint
from blip2_jax.weights.lavis_names import POSITION_IDS, TIED, TO_LAVIS, rename, torch_module
from blip2_jax.weights.load import open_lavis


def from_lavis(src: str | os.PathLike, out: str | os.PathLike, config: config_lib.Blip2Config, *,
               vision: str | os.PathLike | None = None, text: str | os.PathLike | None = None, dtype: Any = None,
               progress: Callable[[int], None] | None = None) -> tuple[model_checkpoint.CheckpointParams, list[str]]:
    """A LAVIS `.pth` -> a model checkpoint at `out` for `config` (a preset of ours); `vision` is
    `eva_vit_g.pth` and `text` the LLM's Hugging Face directory or hub id, for the towers the
    LAVIS file leaves out. Returns the checkpoint and the notes on what was dropped or adapted."""
    source = open_lavis(src, config, vision=vision, text=text)
    leaves = hf_names.iter_from_hf(source.reader, model_checkpoint.abstract_params(source.architecture, config),
                                   qformer_group=config.qformer.cross_attention_frequency, dtype=dtype,
                                   source=str(src))
    model_checkpoint.write(out, source.architecture, config, leaves, source=str(src), progress=progress)
    return model_checkpoint.CheckpointParams.open(out), source.reader.notes


def to_lavis(checkpoint: str | os.PathLike, out: str | os.PathLike, *, step: int | None = None,
             vision_out: str | os.PathLike | None = None, dtype: Any = None) -> list[str]:
    """A stage-1 checkpoint -> LAVIS's `Blip2Qformer` state dict at `out` ({'model': ...}, what
    `blip2_pretrained.pth` holds: no ViT), and the EVA ViT in `eva_vit_g.pth` form at `vision_out`
    when given. Returns notes on what was dropped."""
    torch = torch_module()

    params = model_checkpoint.CheckpointParams.open(checkpoint, step)
    if params.architecture != "Blip2Stage1":
        raise ValueError(f"to-lavis writes stage-1 checkpoints (Blip2Stage1); {params.source} is a "
                         f"{params.architecture}")
    shapes = {p: s for p, (s, _) in params.shapes.items()}
    table = hf_names.slots(shapes, qformer_group=params.config.qformer.cross_attention_frequency)
    tree = params.read(shapes)  # a stage-1 model is small (a Q-Former and a ViT); torch.save needs it whole
    model, vit, notes = {}, {}, []
    for name, slot in table.items():
        value = tree[slot.path] if slot.index is None else tree[slot.path][slot.index]
        value = slot.to_hf(np.asarray(value))
        value = value.astype(dtype) if dtype is not None else value
        layer = re.fullmatch(r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.bias", name)
        if layer:
            d = value.shape[0] // 3
            if np.any(value[d:2 * d]):
                notes.append(f"dropped the nonzero key slice of {name}: softmax ignores a bias on every key")
            pieces = {f"visual_encoder.blocks.{layer.group(1)}.attn.q_bias": value[:d],
                      f"visual_encoder.blocks.{layer.group(1)}.attn.v_bias": value[2 * d:]}
        else:
            pieces = {rename(name, TO_LAVIS): value}
        for key, v in pieces.items():
            (vit if key.startswith("visual_encoder.") else model)[key] = torch.from_numpy(np.array(v))  # keeps 0-d
    for copy, canon in TIED.items():
        model[copy] = model[canon].clone()
    model[POSITION_IDS] = torch.arange(params.config.qformer.max_position_embeddings)[None]
    _save_torch({"model": model}, Path(out))
    if vision_out is not None:
        _save_torch({k[len("visual_encoder."):]: v for k, v in vit.items()}, Path(vision_out))
    else:
        notes.append("left the ViT out (as LAVIS checkpoints do); pass --vision_out to write it")
    return notes


def _save_torch(obj: Any, out: Path) -> None:
    """torch.save to a temporary sibling, renamed when complete."""
    torch = torch_module()
    if out.exists():
        raise FileExistsError(f"{out} exists; choose another path or remove it")
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        tmp.rename(out)
    finally:
        tmp.unlink(missing_ok=True)
