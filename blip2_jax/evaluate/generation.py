"""Captions and answers for a whole data set, sharded over the mesh (batch axes), one compile.

The prompts of the whole set are tokenised first and padded to one bucketed width, so the
generate step compiles once; images are read per global batch, each host its own rows.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import numpy as np

from blip2_jax.data.images import ImageInput, preprocess_images
from blip2_jax.evaluate.batches import EvalBatches, jit_replicated, to_global
from blip2_jax.evaluate.model import EvalModel
from blip2_jax.generation.api import check_lengths, instruction_arrays, prompt_arrays
from blip2_jax.generation.config import GenerationConfig
from blip2_jax.errors import UserError
from blip2_jax.generation.decode import decoding_params, generate
from blip2_jax.generation.qformer_decode import generate_captions
from blip2_jax.models.blip2 import Blip2Stage1


@functools.lru_cache(maxsize=16)
def _compiled(module, mesh, config: GenerationConfig) -> Callable:
    """One jitted generate per (model, mesh, setting): a second evaluation reuses the compile."""
    return jit_replicated(functools.partial(generate, model=module, config=config), mesh)


def generate_texts(model: EvalModel, mesh, images: Sequence[ImageInput], prompts: Sequence[str], tokenizer,
                   config: GenerationConfig, *, batch_size: int = 8, qformer_tokenizer: Any = None,
                   rngs: np.ndarray | None = None, progress: Callable[[int], None] = lambda n: None) -> list[str]:
    """The texts generated after `prompts[i]` for `images[i]` (decoded without special tokens and
    stripped, as LAVIS does), `config.num_return_sequences` per image, image by image;
    `batch_size` is per device. Sampling takes a key per image, `rngs` (n, 2): an image's texts are
    then the same on any mesh and in any batch. An InstructBLIP model also reads each prompt in its
    Q-Former, tokenised by `qformer_tokenizer`, as LAVIS's `generate` gives it. A stage-1 model
    captions (no prompt) with its Q-Former's decoder and BERT `tokenizer`."""
    if model.config.instruction_aware and qformer_tokenizer is None:
        raise ValueError("an InstructBLIP model reads each prompt in its Q-Former too: give its qformer_tokenizer")
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images and {len(prompts)} prompts; need one prompt per image")
    if config.do_sample and (rngs is None or len(rngs) != len(images)):
        raise ValueError("sampling takes a key per image (rngs, shape (n, 2))")
    if not images:
        return []
    if model.config.text is None:
        return _stage1_captions(model, mesh, images, prompts, tokenizer, config, batch_size, rngs, progress)
    token_lists = tokenizer(list(prompts))["input_ids"]
    check_lengths(model.config, token_lists, config.max_new_tokens)
    arrays = dict(zip(("ids", "mask"), prompt_arrays(token_lists, model.config)))
    if config.do_sample:
        arrays["rng"] = np.asarray(rngs, np.uint32)
    if model.config.instruction_aware:  # one width for the whole set: one compile
        arrays.update(zip(("qids", "qmask"), instruction_arrays(qformer_tokenizer, list(prompts), model.config)))
    fn = _compiled(model.module, mesh, config)
    params = decoding_params(model.module, model.params)  # the LLM's layers split once, not per batch

    def run(g: dict[str, Any]):
        instruction = dict(qformer_input_ids=g["qids"], qformer_attention_mask=g["qmask"]) if "qids" in g else {}
        return fn(params, g["x"], g["ids"], g["mask"], g.get("rng"), **instruction)
    return _decode_batches(model, mesh, images, arrays, run, tokenizer, batch_size, progress)


def _stage1_captions(model: EvalModel, mesh, images: Sequence[ImageInput], prompts: Sequence[str], tokenizer,
                     config: GenerationConfig, batch_size: int, rngs: np.ndarray | None,
                     progress: Callable[[int], None]) -> list[str]:
    """A stage-1 model's captions from its Q-Former's ITG head (`generation/qformer_decode.py`)."""
    if not isinstance(model.module, Blip2Stage1):
        raise UserError("captions need a stage-2 model (with a language model) or a stage-1 checkpoint (its "
                        f"Q-Former's ITG head); this checkpoint is a {type(model.module).__name__}")
    if any(prompts):
        raise UserError("a stage-1 model captions without a prompt (its decoder starts at [DEC]); give no --prompt")
    fn = _compiled_stage1(model.module, mesh, config, tokenizer.bos_token_id, tokenizer.sep_token_id,
                          tokenizer.pad_token_id)
    arrays = {"rng": np.asarray(rngs, np.uint32)} if config.do_sample else {}
    return _decode_batches(model, mesh, images, arrays, lambda g: fn(model.params, g["x"], g.get("rng")), tokenizer,
                           batch_size, progress)


@functools.lru_cache(maxsize=16)
def _compiled_stage1(module, mesh, config: GenerationConfig, bos: int, eos: int, pad: int) -> Callable:
    return jit_replicated(functools.partial(generate_captions, model=module, config=config, bos=bos, eos=eos, pad=pad),
                          mesh)


def _decode_batches(model: EvalModel, mesh, images: Sequence[ImageInput], arrays: dict[str, np.ndarray],
                    run: Callable[[dict[str, Any]], Any], tokenizer, batch_size: int,
                    progress: Callable[[int], None]) -> list[str]:
    """`run` over the global batches (images as `x`, and each array's rows), decoded and stripped."""
    batches, texts = EvalBatches.for_mesh(len(images), batch_size, mesh), []
    for valid, local in batches:
        pixels = preprocess_images([images[i] for i in local], model.config.vision.image_size)
        out = run(to_global(mesh, {"x": pixels, **{k: v[local] for k, v in arrays.items()}}, batches.global_batch))
        tokens, lengths = np.asarray(out.tokens)[valid], np.asarray(out.lengths)[valid]
        texts += tokenizer.batch_decode([t[:n].tolist() for t, n in zip(tokens.reshape(-1, tokens.shape[-1]),
                                                                         lengths.reshape(-1))],
                                        skip_special_tokens=True)
        progress(int(valid.sum()))
    return [t.strip() for t in texts]
