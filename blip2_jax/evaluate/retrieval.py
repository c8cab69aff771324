"""Image-text retrieval as LAVIS evaluates it (spec §8), sharded over the mesh.

1. Text features: normalised projected [CLS] of the text-only Q-Former pass, all texts.
2. Image features: normalised projected queries, and `ln_vision(ViT(x))` kept (host memory) for ITM.
3. ITC similarity `sims[i, j] = max_q <image_feats[i, q], text_feats[j]>` (raw cosine), computed
   with the image pass, one global batch of images against every text.
4. Re-rank: each image's top-k texts and each text's top-k images are scored by ITM (the mean over
   queries of the positive-class logit) + ITC; every other entry is -100. A pair that is in both
   top-k lists is scored once (LAVIS scores it twice, with the same result).

`k_test=0` skips the re-rank: the scores are the ITC similarities (zero-shot classification).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import numpy as np
from flax import linen as nn

from blip2_jax.data.images import ImageInput, preprocess_images
from blip2_jax.data.tokenizers import qformer_text
from blip2_jax.evaluate.batches import EvalBatches, jit_replicated, replicate, to_global
from blip2_jax.evaluate.model import EvalModel

TEXT_LENGTH = 35  # LAVIS compute_sim_matrix: padding max_length 35
UNRANKED = -100.0  # LAVIS's score for pairs outside the top-k

Progress = Callable[[int], None]


@dataclasses.dataclass
class RetrievalScores:
    sims: np.ndarray  # (images, texts) ITC cosine
    i2t: np.ndarray  # (images, texts) re-ranked scores
    t2i: np.ndarray  # (texts, images)


@functools.lru_cache(maxsize=16)
def _compiled(module: nn.Module, mesh, what: str) -> Callable:
    """One jitted function per (model, mesh, pass): a second evaluation reuses the compiles."""
    def text(params, ids, mask):
        return module.apply({"params": params}, ids, mask, method="text_features")

    def image(params, pixels, texts):
        """(ITC sims against every text, ln_vision(ViT) embeddings) of a batch of images."""
        embeds = module.apply({"params": params}, pixels, method="encode_image")
        feats = module.apply({"params": params}, embeds, method="image_features")
        return (feats @ texts.T).max(axis=1), embeds

    def itm(params, embeds, ids, mask):
        return module.apply({"params": params}, embeds, ids, mask, method="itm")[:, 1]

    return jit_replicated({"text": text, "image": image, "itm": itm}[what], mesh)


def _text_features(model: EvalModel, mesh, ids: np.ndarray, mask: np.ndarray, batch_size: int,
                   progress: Progress) -> np.ndarray:
    fn = _compiled(model.module, mesh, "text")
    batches, out = EvalBatches.for_mesh(len(ids), batch_size, mesh), []
    for valid, local in batches:
        g = to_global(mesh, {"ids": ids[local], "mask": mask[local]}, batches.global_batch)
        out.append(np.asarray(fn(model.params, g["ids"], g["mask"]))[valid])
        progress(int(valid.sum()))
    return np.concatenate(out)


def _image_pass(model: EvalModel, mesh, images: Sequence[ImageInput], text_feats: np.ndarray, batch_size: int,
                progress: Progress) -> tuple[np.ndarray, np.ndarray]:
    """(ITC sims (images, texts), ln_vision(ViT) embeddings (images, N, Dv)) in the compute dtype."""
    fn = _compiled(model.module, mesh, "image")
    texts = replicate(mesh, text_feats)
    batches, sims, embeds = EvalBatches.for_mesh(len(images), batch_size, mesh), [], []
    for valid, local in batches:
        pixels = preprocess_images([images[i] for i in local], model.config.vision.image_size)
        s, e = fn(model.params, to_global(mesh, {"x": pixels}, batches.global_batch)["x"], texts)
        sims.append(np.asarray(s)[valid])
        embeds.append(np.asarray(e)[valid])
        progress(int(valid.sum()))
    return np.concatenate(sims), np.concatenate(embeds)


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """(rows, k) column indices of each row's k highest scores, best first; ties to the lower index."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def _itm_scores(model: EvalModel, mesh, pairs: np.ndarray, embeds: np.ndarray, ids: np.ndarray, mask: np.ndarray,
                batch_size: int, progress: Progress) -> np.ndarray:
    """ITM positive-class logit (mean over queries) for each (image, text) row of `pairs`."""
    fn = _compiled(model.module, mesh, "itm")
    batches, out = EvalBatches.for_mesh(len(pairs), batch_size, mesh), []
    for valid, local in batches:
        image, text = pairs[local, 0], pairs[local, 1]
        g = to_global(mesh, {"e": embeds[image], "i": ids[text], "m": mask[text]}, batches.global_batch)
        out.append(np.asarray(fn(model.params, g["e"], g["i"], g["m"]))[valid])
        progress(int(valid.sum()))
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def retrieval_scores(model: EvalModel, mesh, images: Sequence[ImageInput], texts: Sequence[str], tokenizer, *,
                     k_test: int = 128, batch_size: int = 8, itm_batch_size: int | None = None,
                     text_length: int = TEXT_LENGTH,
                     progress: Progress = lambda n: None) -> RetrievalScores:
    """Re-ranked i2t and t2i score matrices for `images` x `texts` (texts already pre-processed);
    `batch_size` and `itm_batch_size` (pairs) are per device; texts are cut at `text_length` tokens."""
    if not hasattr(model.module, "itm"):
        raise ValueError(f"retrieval needs a model with the ITC/ITM heads (Blip2ForImageTextRetrieval or a "
                         f"stage-1 checkpoint); this checkpoint is a {type(model.module).__name__}")
    if not images or not texts:
        raise ValueError(f"retrieval needs images and texts, got {len(images)} images and {len(texts)} texts")
    tokens = [qformer_text(tokenizer, t, text_length) for t in texts]
    ids = np.stack([t["text_ids"] for t in tokens])
    mask = np.stack([t["text_mask"] for t in tokens])
    text_feats = _text_features(model, mesh, ids, mask, batch_size, progress)
    sims, embeds = _image_pass(model, mesh, images, text_feats, batch_size, progress)
    sims = sims.astype(np.float32)
    if k_test == 0:
        return RetrievalScores(sims, sims.copy(), sims.T.copy())
    i2t_top = _top_k(sims, min(k_test, len(texts)))  # (images, k) text indices
    t2i_top = _top_k(sims.T, min(k_test, len(images)))  # (texts, k) image indices
    i2t_pairs = np.stack([np.repeat(np.arange(len(images)), i2t_top.shape[1]), i2t_top.ravel()], 1)
    t2i_pairs = np.stack([t2i_top.ravel(), np.repeat(np.arange(len(texts)), t2i_top.shape[1])], 1)
    all_pairs = np.concatenate([i2t_pairs, t2i_pairs])
    pairs, where = np.unique(all_pairs, axis=0, return_inverse=True)
    itm = _itm_scores(model, mesh, pairs, embeds, ids, mask, itm_batch_size or batch_size, progress)
    score = itm[where.ravel()] + sims[all_pairs[:, 0], all_pairs[:, 1]]
    i2t = np.full(sims.shape, UNRANKED, np.float32)
    t2i = np.full(sims.T.shape, UNRANKED, np.float32)
    n = len(i2t_pairs)
    i2t[i2t_pairs[:, 0], i2t_pairs[:, 1]] = score[:n]
    t2i[t2i_pairs[:, 1], t2i_pairs[:, 0]] = score[n:]
    return RetrievalScores(sims, i2t, t2i)
