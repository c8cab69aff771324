"""`load(path_or_id, mesh=..., shardings=...)`: a Hugging Face directory or hub id, a model
checkpoint (`blip2-jax convert`), a training workdir or one of its steps, or a LAVIS `.pth`
(`open_lavis`) -> architecture, config, tokenizer source and parameters, each leaf placed straight
into its sharding.

No host copy of the model is ever made. Orbax sources restore with sharded targets, so each
device's shard is read from the checkpoint and nothing else. Safetensors leaves are built by
`jax.make_array_from_callback`: each device's callback slices its shard out of the file's memory
map (through the layout transform, a view), so the host holds about one shard at a time. On
accelerators the arrays then leave the host entirely; on simulated CPU devices they are the host
memory the model needs, and only the transient copies are saved (`benchmarks/load_memory.py`).
A LAVIS `.pth` is opened by torch with `mmap=True`, so its tensors are read the same way.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from absl import logging
from flax import linen as nn
from flax import traverse_util
from jax.sharding import Mesh, SingleDeviceSharding

from blip2_jax.models import blip2, quantization
from blip2_jax.models import config as config_lib
from blip2_jax.models.interpolate import interpolate_position_embedding
from blip2_jax.parallel import mesh as mesh_lib
from blip2_jax.weights import hf_names
from blip2_jax.weights.hf_checkpoint import config_differences, hf_architecture, hf_tensors, read_config, resolve
from blip2_jax.errors import UserError
from blip2_jax.weights.hf_names import CheckpointMismatchError
from blip2_jax.weights.lavis_names import LavisTensors, lavis_tensors
from blip2_jax.weights.model_checkpoint import METADATA, CheckpointParams

Tree = Any
POSITIONS = "vision_model/embeddings/position_embedding"


@dataclasses.dataclass(frozen=True)
class Loaded:
    architecture: str  # a `blip2.ARCHITECTURES` name
    config: config_lib.Blip2Config
    tokenizer: str  # where the checkpoint's tokenizer is ("" if it has none)
    params: Tree  # placed in the shardings asked for
    source: str


def is_model_checkpoint(path: str | os.PathLike) -> bool:
    """A model checkpoint, a training workdir or one of its `checkpoints/<step>` directories."""
    path = Path(path)
    return (path / METADATA).exists() or (path / "checkpoints").exists() or path.parent.name == "checkpoints"


@dataclasses.dataclass(frozen=True)
class Source:
    """What a checkpoint holds, known from its metadata or config.json alone: a command checks it
    (the architecture it needs, a tokenizer) before any weight is read."""
    architecture: str  # a `blip2.ARCHITECTURES` name
    config: config_lib.Blip2Config
    tokenizer: str  # where the checkpoint's tokenizer is ("" if it has none)
    name: str
    reader: CheckpointParams | Path | LavisTensors  # Orbax, a Hugging Face directory, a LAVIS .pth


def open_source(path_or_id: str | os.PathLike, step: int | None = None) -> Source:
    """The checkpoint at `path_or_id` (a workdir's latest step, or `step`), weights not yet read."""
    if Path(path_or_id).suffix == ".pth":
        raise UserError(f"{path_or_id}: a LAVIS .pth names no model config; open it with weights.load.open_lavis("
                        "path, presets.get(<preset>), vision=..., text=...), or convert it (blip2-jax convert "
                        "from-lavis)")
    if is_model_checkpoint(path_or_id):
        params = CheckpointParams.open(path_or_id, step)
        return Source(params.architecture, params.config, params.tokenizer, params.source, params)
    directory = resolve(path_or_id)
    config = config_lib.from_hf(read_config(directory))
    tokenizer = str(directory) if Path(path_or_id).is_dir() else str(path_or_id)
    return Source(hf_architecture(directory, config), config, tokenizer, str(directory), directory)


def open_lavis(src: str | os.PathLike, config: config_lib.Blip2Config, *, vision: str | os.PathLike | None = None,
               text: str | os.PathLike | None = None) -> Source:
    """A LAVIS `.pth` for `config` (a preset of ours), with `vision` (`eva_vit_g.pth`) and `text`
    (the LLM's Hugging Face directory or hub id, also its tokenizer) for the towers LAVIS leaves
    out. `load` then reads each device's shard from torch's memory map of the file."""
    architecture, tensors = lavis_tensors(src, config, vision=vision, text=text)
    return Source(architecture, config, str(text) if text is not None else "", str(src), tensors)


def load(source: str | os.PathLike | Source, *, mesh: Mesh | None = None, shardings: Tree | None = None,
         dtype: Any = None, step: int | None = None, like: config_lib.Blip2Config | None = None,
         int8: Sequence[str] = (), **overrides) -> Loaded:
    """The checkpoint `source` (a path or hub id, or what `open_source` made of one) with its
    parameters placed in `shardings` (a tree like the parameters), else on `mesh` by the default
    logical rules, else on the first device. `dtype` (default: the config's `param_dtype`) is the
    parameters' dtype; `step` picks a workdir's step; `overrides` set non-architectural config
    fields (`dtype`, `param_dtype`, `remat_policy`).

    `like` is the config the caller's model has: the checkpoint must agree with it in every
    architecture field but `vision.image_size`. Fine-tuning starts 364 or 490 px models from 224 px
    weights, so the ViT position table (one small leaf) is then read whole, resized bicubically on
    the host (align_corners=False, as LAVIS and HF's `interpolate_pos_encoding` do for EVA ViT-g,
    spec §2.1) and placed in its sharding; every other leaf is read shard by shard as always.

    `int8` (dense-layer regexes, `models/quantization.py`) quantizes those kernels of a float
    checkpoint once read, a layer at a time into the kernel's sharding; the config returned says so,
    and `shardings`, when given, are those of the quantized tree.
    """
    source = source if isinstance(source, Source) else open_source(source, step)
    stored = source.config.replace(**overrides) if overrides else source.config
    if like is not None:
        check_like(source, like)
    config = stored if like is None else like
    quantized = config.replace(int8=tuple(int8)) if int8 and not config.int8 else None
    boxed = blip2.abstract_params(config, unbox=False, model=blip2.build(config, source.architecture))
    if shardings is None:
        target = boxed if quantized is None else blip2.abstract_params(
            quantized, unbox=False, model=blip2.build(quantized, source.architecture))
        shardings = (mesh_lib.logical_shardings(target, mesh) if mesh is not None else
                     jax.tree.map(lambda _: SingleDeviceSharding(jax.local_devices()[0]), target,
                                  is_leaf=lambda x: hasattr(x, "unbox")))
    out_shardings = shardings
    # a float kernel is read into the sharding its int8 copy will have (same shape and axes)
    flat_shardings = {p: sh for p, sh in traverse_util.flatten_dict(shardings, sep="/").items()
                      if not (quantized and p.endswith("/" + quantization.SCALE))}
    abstract = nn.unbox(boxed)
    dtypes = {p: np.dtype(dtype if dtype is not None and not quantization.keeps_dtype(p, leaf.dtype) else leaf.dtype)
              for p, leaf in traverse_util.flatten_dict(abstract, sep="/").items()}
    resize = config.vision.image_size != stored.vision.image_size
    read_shardings = {**flat_shardings, POSITIONS: SingleDeviceSharding(jax.local_devices()[0])} if resize \
        else flat_shardings
    if isinstance(source.reader, CheckpointParams):
        flat = source.reader.read_sharded(read_shardings, dtypes)
    else:
        stored_abstract = abstract if not resize else blip2.abstract_params(
            stored, model=blip2.build(stored, source.architecture))
        tensors = hf_tensors(source.reader, source.architecture) if isinstance(source.reader, Path) \
            else source.reader
        flat = hf_leaves(tensors, stored_abstract, read_shardings, dtypes,
                         qformer_group=config.qformer.cross_attention_frequency, source=source.name)
    if resize:
        table = np.asarray(flat[POSITIONS])
        resized = interpolate_position_embedding(table.astype(np.float32), (config.vision.grid,) * 2,
                                                 align_corners=False)
        flat[POSITIONS] = jax.device_put(np.asarray(resized).astype(table.dtype), flat_shardings[POSITIONS])
        logging.info("%s: interpolated the ViT position table from %d to %d px (%d to %d positions)", source.name,
                     stored.vision.image_size, config.vision.image_size, table.shape[1], config.vision.num_positions)
    params = traverse_util.unflatten_dict(flat, sep="/")
    if quantized:
        params, config = quantization.quantize_placed(params, quantized.int8, out_shardings), quantized
    return Loaded(source.architecture, config, source.tokenizer, params, source.name)


def check_like(source: Source, like: config_lib.Blip2Config, requested: str = "the requested config") -> None:
    """`source` holds weights for `like` (named `requested` in the error), up to the image size
    (resized on load)."""
    at_size = source.config.replace(vision=dataclasses.replace(source.config.vision,
                                                               image_size=like.vision.image_size))
    diffs = config_differences(like, at_size)
    if diffs:
        raise CheckpointMismatchError(f"{source.name} does not match {requested} (requested vs checkpoint):\n  "
                                      + "\n  ".join(diffs))


def hf_leaves(tensors: Mapping[str, Any], abstract: Tree, shardings: dict[str, jax.sharding.Sharding],
              dtypes: dict[str, np.dtype], *, qformer_group: int, source: str) -> dict[str, jax.Array]:
    """Every leaf of our tree (shapes of `abstract`) from Hugging Face `tensors`, built shard by shard
    in `shardings` and `dtypes` (path -> ...), after `hf.leaf_sources`' strict checks."""
    shapes = hf_names.flat_shapes(abstract)
    return {path: jax.make_array_from_callback(shapes[path], shardings[path],
                                               _shard_reader(tensors, entries, dtypes[path], source))
            for path, entries in hf_names.leaf_sources(tensors, abstract, qformer_group=qformer_group,
                                                       source=source).items()}


def _shard_reader(tensors: Mapping[str, Any], entries: list[tuple[str, hf_names.Slot]], dtype: np.dtype,
                  source: str):
    """index (a tuple of slices of our leaf) -> that block, read from the tensors it comes from."""
    by_layer = {slot.index: (name, slot) for name, slot in entries}

    def view(name: str, slot: hf_names.Slot) -> np.ndarray:
        return slot.to_flax(hf_names.to_numpy(tensors[name]))

    def read(index: tuple[slice, ...]) -> np.ndarray:
        if None in by_layer:  # one tensor, not stacked
            (name, slot), = entries
            block = np.array(view(name, slot)[index], dtype, order="C")  # a copy, not a view of the file
            return hf_names.finite(name, block, source)
        layers = range(*index[0].indices(len(by_layer)))
        first = view(*by_layer[layers[0]])[index[1:]] if len(layers) else None
        block = np.empty((len(layers), *(first.shape if first is not None else ())), dtype)
        for k, i in enumerate(layers):
            name, slot = by_layer[i]
            block[k] = hf_names.finite(name, view(name, slot)[index[1:]], source)
        return block

    return read
