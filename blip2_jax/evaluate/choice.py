"""Multiple choice by ranking the candidate answers (ScienceQA-image, as InstructBLIP scores it):
each candidate's negative log-likelihood as the LLM's target after the image and the prompt,
summed over its tokens (LAVIS `predict_class`); the lowest wins.

Every (question, candidate) pair is one row of the stage-2 batch the training loss reads
(`data.tokenizers.stage2_text`: the prompt no target, the candidate the target as a training
answer is, EOS included), scored by `objectives.stage2.sequence_nll` over the mesh, one compile.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import numpy as np

from blip2_jax.data.images import ImageInput, preprocess_images
from blip2_jax.data.tokenizers import stage2_text
from blip2_jax.evaluate.batches import EvalBatches, jit_replicated, to_global
from blip2_jax.evaluate.model import EvalModel
from blip2_jax.generation.api import instruction_arrays
from blip2_jax.objectives.stage2 import sequence_nll


LENGTH_BUCKET = 8


@functools.lru_cache(maxsize=4)
def _compiled(module, mesh) -> Callable:
    return jit_replicated(functools.partial(sequence_nll, model=module), mesh)


def candidate_nll(model: EvalModel, mesh, images: Sequence[ImageInput], prompts: Sequence[str],
                  candidates: Sequence[Sequence[str]], tokenizer: Any, *, batch_size: int = 8,
                  qformer_tokenizer: Any = None, progress: Callable[[int], None] = lambda n: None) -> list[np.ndarray]:
    """For sample i, the summed NLL of each of `candidates[i]` after `images[i]` and `prompts[i]`
    (an InstructBLIP's Q-Former reads the prompt too); `batch_size` rows per device."""
    text = model.config.text
    if text is None:
        raise ValueError("ranking answers needs a BLIP-2 model with a language model; this is a retrieval model")
    if model.config.instruction_aware and qformer_tokenizer is None:
        raise ValueError("an InstructBLIP model reads each prompt in its Q-Former too: give its qformer_tokenizer")
    pairs = [(i, c) for i, options in enumerate(candidates) for c in options]
    if not pairs:
        return []
    kind = f"stage2_{text.model_type}"
    # long enough for every pair (BOS/EOS included), so no candidate is ever cut; one width: one compile
    longest = max(len(tokenizer(t)["input_ids"]) for i, c in pairs for t in (prompts[i], c, f"{prompts[i]} {c}"))
    text_length = -(-(longest + 2) // LENGTH_BUCKET) * LENGTH_BUCKET
    rows = [stage2_text(kind, tokenizer, prompts[i], c, text_length) for i, c in pairs]
    arrays = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    if model.config.instruction_aware:
        arrays["qformer_ids"], arrays["qformer_mask"] = instruction_arrays(
            qformer_tokenizer, [prompts[i] for i, _ in pairs], model.config)
    fn = _compiled(model.module, mesh)
    batches, scores = EvalBatches.for_mesh(len(pairs), batch_size, mesh), []
    for valid, local in batches:
        pixels = preprocess_images([images[pairs[j][0]] for j in local], model.config.vision.image_size)
        batch = to_global(mesh, {"image": pixels, **{k: v[local] for k, v in arrays.items()}}, batches.global_batch)
        scores.append(np.asarray(fn(model.params, batch))[valid])
        progress(int(valid.sum()))
    flat = np.concatenate(scores)
    bounds = np.cumsum([0] + [len(options) for options in candidates])
    return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
