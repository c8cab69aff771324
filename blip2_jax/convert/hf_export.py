"""Our checkpoints to Hugging Face directories, and Hugging Face directories to our checkpoints.

`to_hf` writes what `Blip2ForConditionalGeneration.from_pretrained` / `Blip2ForImageTextRetrieval
.from_pretrained` and `Blip2Processor.from_pretrained` read: `config.json` (written by
`transformers.Blip2Config` itself), `model.safetensors` or index-sharded
`model-0000x-of-0000y.safetensors`, and the processor files (the tokenizer with `<image>` added,
the BLIP image processor at the model's resolution). A stage-1 checkpoint exports as
`Blip2ForImageTextRetrieval`; its Q-Former LM head and `temp`, which no Hugging Face class has,
go to `blip2_jax_stage1.safetensors` beside the weights (transformers ignores the file, `from_hf`
reads it back), so the round trip is lossless.

Both directions stream: the output is planned from shapes alone, and tensors are read, laid out
and written one at a time (export reads one of our stacked leaves at a time).
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

from blip2_jax.data.tokenizers import INSTRUCTION_TOKENIZER_DIR
from blip2_jax.errors import InputNotFound
from blip2_jax.models import config as config_lib
from blip2_jax.models import lora, quantization
from blip2_jax.weights import hf_names
from blip2_jax.weights import model_checkpoint
from blip2_jax.weights import peft
from blip2_jax.weights import safetensors_io
from blip2_jax.weights.hf_checkpoint import (SAFE_INDEX, SAFE_WEIGHTS, STAGE1_EXTRAS, hf_architecture, hf_tensors,
                                             read_config, resolve)

# Files of a Hugging Face directory that describe its tokenizer and processor (copied by from-hf).
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "preprocessor_config.json",
                   "processor_config.json", "chat_template.jinja", "generation_config.json")
IMAGE_TOKEN = "<image>"
ADAPTER_DIR = "adapter"  # a LoRA model's PEFT adapter, beside its base model


def _is_stage1_extra(name: str) -> bool:
    return name == "temp" or name.startswith("cls.")


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes (decimal units as `save_pretrained`)."""
    if isinstance(text, int):
        return text
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    t = text.strip().upper()
    for unit, scale in units.items():
        if t.endswith(unit) and t[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(t[: -len(unit)]) * scale)
    if t.isdigit():
        return int(t)
    raise ValueError(f"cannot read the size {text!r}: use e.g. 5GB, 500MB or a number of bytes")


# ---------------------------------------------------------------------------------------------
# Hugging Face -> ours

def from_hf(src: str | os.PathLike, out: str | os.PathLike, *, dtype: Any = None, adapter: str | None = None,
            progress: Callable[[int], None] | None = None) -> model_checkpoint.CheckpointParams:
    """A Hugging Face BLIP-2 directory or hub id -> a model checkpoint at `out` (see
    `model_checkpoint`), validated in full before anything is written; with `adapter`, a PEFT LoRA
    adapter directory for it, whose adapters the checkpoint then holds (unmerged)."""
    directory = resolve(src, extra_patterns=PROCESSOR_FILES + (STAGE1_EXTRAS, f"{INSTRUCTION_TOKENIZER_DIR}/*"))
    config = config_lib.from_hf(read_config(directory))
    architecture = hf_architecture(directory, config)
    tensors = hf_tensors(directory, architecture)
    abstract = model_checkpoint.abstract_params(architecture, config)
    qformer_group = config.qformer.cross_attention_frequency
    adapters: dict[str, np.ndarray] = {}
    if adapter:
        lora_config, adapters = peft.read_adapter(adapter, hf_names.flat_shapes(abstract), qformer_group=qformer_group)
        config = config.replace(lora=lora_config)
        if dtype is not None:
            adapters = {p: v if lora.is_constant(p) else v.astype(dtype) for p, v in adapters.items()}
    leaves = itertools.chain(hf_names.iter_from_hf(tensors, abstract, qformer_group=qformer_group, dtype=dtype,
                                                   source=str(directory)), adapters.items())
    files = [directory / f for f in PROCESSOR_FILES if (directory / f).is_file()]
    files += [directory / INSTRUCTION_TOKENIZER_DIR] if (directory / INSTRUCTION_TOKENIZER_DIR).is_dir() else []
    model_checkpoint.write(out, architecture, config, leaves, source=str(src), copy_files=files, progress=progress)
    return model_checkpoint.CheckpointParams.open(out)


# ---------------------------------------------------------------------------------------------
# ours -> Hugging Face

def _hf_config(params: model_checkpoint.CheckpointParams, image_token_index: int | None) -> Any:
    import transformers  # pylint: disable=import-outside-toplevel

    d = config_lib.to_hf(params.config.replace(image_token_index=image_token_index))
    if params.config.text is None:
        d.pop("text_config", None)
        d.pop("image_token_index", None)
    cfg = (transformers.InstructBlipConfig if params.config.instruction_aware else transformers.Blip2Config)(**d)
    cfg.architectures = list(d["architectures"])
    return cfg


def _tensor_plan(params: model_checkpoint.CheckpointParams, dtype: Any
                 ) -> tuple[list[tuple[str, tuple[int, ...], np.dtype]], dict[str, hf_names.Slot]]:
    """(HF name, shape, dtype) of every tensor written, and where each comes from. Adapters and int8
    scales are no HF tensors: an int8 kernel is written dequantized (float32 by default)."""
    shapes = {p: s for p, (s, _) in params.shapes.items()
              if not lora.is_adapter_leaf(p) and not p.endswith("/" + quantization.SCALE)}
    table = hf_names.slots(shapes, qformer_group=params.config.qformer.cross_attention_frequency)

    def stored(path: str) -> np.dtype:
        return np.dtype(np.float32) if params.shapes[path][1] == np.int8 else params.shapes[path][1]

    plan = [(name, hf_names.hf_shape(slot, shapes[slot.path]), np.dtype(dtype) if dtype is not None
             else stored(slot.path)) for name, slot in table.items()]
    return plan, table


class _LeafReader:
    """Produces HF tensors in plan order. Our leaves are read in batches of up to `batch_bytes`
    (one Orbax restore per batch, not per leaf) and dropped once their tensors are written, so
    memory stays at one batch plus the largest leaf."""

    def __init__(self, params: model_checkpoint.CheckpointParams, table: dict[str, hf_names.Slot], dtype: Any,
                 order: list[str], batch_bytes: int = 256 << 20, merge: frozenset[str] = frozenset()):
        """`merge`: adapted layers whose kernels are written with their LoRA adapter folded in."""
        self.params, self.table, self.dtype, self.batch_bytes = params, table, dtype, batch_bytes
        self.merge = merge
        self.order = list(dict.fromkeys(table[n].path for n in order))  # leaves in the order they are needed
        self.cache: dict[str, np.ndarray] = {}
        self.current: str | None = None

    def _float_kernel(self, layer: str, kernel: np.ndarray) -> np.ndarray:
        """An int8 kernel dequantized; with the layer's adapter folded in when it is merged."""
        if kernel.dtype == np.int8:
            kernel = quantization.dequantize_kernel(kernel, self.params.read([f"{layer}/{quantization.SCALE}"])[
                f"{layer}/{quantization.SCALE}"])
        if layer in self.merge:
            adapter = self.params.read([f"{layer}/{k}" for k in (lora.A, lora.B, lora.SCALING)])
            kernel = (kernel.astype(np.float32) + lora.delta(
                *(adapter[f"{layer}/{k}"] for k in (lora.A, lora.B, lora.SCALING)))).astype(kernel.dtype)
        return kernel

    def _nbytes(self, path: str) -> int:
        shape, dtype = self.params.shapes[path]
        return dtype.itemsize * int(np.prod(shape, dtype=np.int64))

    def __call__(self, name: str) -> np.ndarray:
        slot = self.table[name]
        if slot.path != self.current and self.current is not None:
            self.cache.pop(self.current, None)  # every tensor of the previous leaf is written
        self.current = slot.path
        if slot.path not in self.cache:
            start = self.order.index(slot.path)
            batch, size = [], 0
            for path in self.order[start:]:
                if batch and size + self._nbytes(path) > self.batch_bytes:
                    break
                batch.append(path)
                size += self._nbytes(path)
            self.cache.update(self.params.read(batch))
            for path in batch:
                if path.endswith("/kernel"):
                    self.cache[path] = self._float_kernel(path[: -len("/kernel")], self.cache[path])
        value = self.cache[slot.path]
        value = slot.to_hf(np.asarray(value if slot.index is None else value[slot.index]))
        return value.astype(self.dtype) if self.dtype is not None else value


def _language_tokenizer_with_image_token(source: str, config: config_lib.Blip2Config) -> tuple[Any, int]:
    """The LLM tokenizer with `<image>` added; its id must be the config's image_token_index."""
    from blip2_jax.data.tokenizers import language_tokenizer  # pylint: disable=import-outside-toplevel

    from tokenizers import AddedToken  # pylint: disable=import-outside-toplevel

    tokenizer = language_tokenizer(source)
    # as Blip2Processor does; a token already in the vocabulary keeps its id and becomes special
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    want = config.image_token_index
    if want is not None and token_id != want:
        raise ValueError(f"the tokenizer from {source} gives {IMAGE_TOKEN} the id {token_id}, but the model's "
                         f"image_token_index is {want}: use the tokenizer the model was trained with")
    if token_id >= config.text.vocab_size:
        raise ValueError(f"{IMAGE_TOKEN} gets id {token_id}, outside the language model's {config.text.vocab_size} "
                         "embedding rows")
    tokenizer.image_token = IMAGE_TOKEN
    return tokenizer, token_id


def _write_processor(directory: Path, params: model_checkpoint.CheckpointParams, tokenizer_source: str) -> int | None:
    """Processor files (tokenizer + image processor) into `directory`; returns image_token_index."""
    from transformers import Blip2Processor, BlipImageProcessorPil  # pylint: disable=import-outside-toplevel

    config = params.config
    if not tokenizer_source:
        raise ValueError(f"no tokenizer is known for {params.source}: pass --tokenizer (a directory or hub id of "
                         f"the {'language model' if config.text is not None else 'Q-Former BERT'} tokenizer)")
    if not Path(tokenizer_source).exists() and (tokenizer_source.startswith(("/", ".", "~"))
                                                or tokenizer_source.count("/") > 1):
        raise InputNotFound(f"tokenizer directory {tokenizer_source} not found")
    if config.text is None:
        from blip2_jax.data.tokenizers import qformer_tokenizer  # pylint: disable=import-outside-toplevel

        tokenizer, image_token_index = qformer_tokenizer(tokenizer_source), None
        if len(tokenizer) != config.qformer.vocab_size:  # also catches a path that held no tokenizer
            raise ValueError(f"the Q-Former tokenizer from {tokenizer_source} has {len(tokenizer)} tokens with [DEC], "
                             f"the model's Q-Former vocabulary {config.qformer.vocab_size}")
    else:
        tokenizer, image_token_index = _language_tokenizer_with_image_token(tokenizer_source, config)
    size = config.vision.image_size
    image_processor = BlipImageProcessorPil(size={"height": size, "width": size})
    if config.instruction_aware:
        _instruct_processor(image_processor, tokenizer, Path(tokenizer_source) / INSTRUCTION_TOKENIZER_DIR,
                            config).save_pretrained(directory)
    else:
        Blip2Processor(image_processor, tokenizer, num_query_tokens=config.num_query_tokens).save_pretrained(directory)
    return image_token_index


def _instruct_processor(image_processor: Any, tokenizer: Any, qformer_tokenizer: Path,
                        config: config_lib.Blip2Config) -> Any:
    """InstructBLIP's processor: the LLM tokenizer and the Q-Former's own (the `qformer_tokenizer/`
    subfolder `from-hf` kept beside the LLM tokenizer)."""
    from transformers import AutoTokenizer, InstructBlipProcessor  # pylint: disable=import-outside-toplevel

    if not qformer_tokenizer.is_dir():
        raise InputNotFound(f"InstructBLIP's processor needs the Q-Former tokenizer: {qformer_tokenizer} not found "
                            "(a directory holding it, beside the language model tokenizer)")
    return InstructBlipProcessor(image_processor, tokenizer, AutoTokenizer.from_pretrained(str(qformer_tokenizer)),
                                 num_query_tokens=config.num_query_tokens)


def to_hf(checkpoint: str | os.PathLike | model_checkpoint.CheckpointParams, out: str | os.PathLike, *,
          step: int | None = None, dtype: Any = None, tokenizer: str = "", max_shard_size: str | int = "5GB",
          merge_lora: bool = False, progress: Callable[[int], None] | None = None) -> Path:
    """A model checkpoint or training workdir (a path, or one already opened) -> a Hugging Face
    directory at `out`. A model with LoRA adapters is written as its base model plus the adapters
    as a PEFT directory `out/adapter` (`PeftModel.from_pretrained(model, out / "adapter")`), or with
    `merge_lora` as one model with the adapters folded into its kernels."""
    params = checkpoint if isinstance(checkpoint, model_checkpoint.CheckpointParams) else \
        model_checkpoint.CheckpointParams.open(checkpoint, step)
    if params.config.vision.variant != "eva":
        raise ValueError(f"{params.source} has LAVIS's CLIP ViT-L, which no Hugging Face BLIP-2 class holds")
    out = Path(out)
    tmp = model_checkpoint.temporary_sibling(out)
    try:
        image_token_index = _write_processor(tmp, params, tokenizer or params.tokenizer)
        _hf_config(params, image_token_index).save_pretrained(tmp)
        plan, table = _tensor_plan(params, dtype)
        extras = [t for t in plan if _is_stage1_extra(t[0])]
        weights = [t for t in plan if not _is_stage1_extra(t[0])]
        adapted = frozenset(lora.adapted_layers(params.shapes))
        produce = _LeafReader(params, table, dtype, [t[0] for t in weights + extras],
                              merge=adapted if merge_lora else frozenset())
        shards = safetensors_io.plan_shards(weights, parse_size(max_shard_size))
        names = [SAFE_WEIGHTS] if len(shards) == 1 else [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for name, shard in zip(names, shards):
            safetensors_io.write_file(tmp / name, shard, produce, progress=progress)
        if len(shards) > 1:
            total = sum(np.dtype(d).itemsize * int(np.prod(s, dtype=np.int64)) for _, s, d in weights)
            index = {"metadata": {"total_size": total},
                     "weight_map": {t[0]: n for n, shard in zip(names, shards) for t in shard}}
            (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
        if extras:
            safetensors_io.write_file(tmp / STAGE1_EXTRAS, extras, produce, progress=progress)
        if adapted and not merge_lora:
            peft.write_adapter(tmp / ADAPTER_DIR, params.shapes, params.read,
                               qformer_group=params.config.qformer.cross_attention_frequency,
                               base=model_checkpoint.absolute(out), dtype=dtype)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out

