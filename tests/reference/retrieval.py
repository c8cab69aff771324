"""LAVIS's retrieval re-rank (`compute_sim_matrix`, spec §8) on a `transformers.Blip2ForImageTextRetrieval`,
written against the HF submodules so that ours is checked against an implementation it shares no code with.

Top-k ties go to the lower index (a stable sort, not `torch.topk`), the rule ours follows, so the two
re-rank the same pairs.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import transformers
from torch.nn import functional as F

UNRANKED = -100.0  # LAVIS's score for pairs outside the top-k
Model = transformers.Blip2ForImageTextRetrieval


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def text_features(model: Model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """normalize(text_projection([CLS])) of the text-only Q-Former pass: (B, E)."""
    hidden = model.qformer(query_embeds=model.embeddings(input_ids=ids), query_length=0,
                           attention_mask=mask).last_hidden_state
    return F.normalize(model.text_projection(hidden[:, 0]), dim=-1)


def image_pass(model: Model, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ln_vision(ViT) embeddings (B, N, Dv), normalised projected queries (B, Q, E))."""
    embeds = model.vision_model(pixel_values=pixels).last_hidden_state  # post_layernorm applied = LAVIS ln_vision
    queries = model.query_tokens.expand(len(pixels), -1, -1)
    out = model.qformer(query_embeds=queries, encoder_hidden_states=embeds,
                        encoder_attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long)).last_hidden_state
    return embeds, F.normalize(model.vision_projection(out), dim=-1)


def itm_positive(model: Model, embeds: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Positive-class ITM logit, mean over the query rows of a joint bidirectional [queries; text] pass: (B,)."""
    queries = model.query_tokens.expand(len(ids), -1, -1)
    q = queries.shape[1]
    rows = model.embeddings(input_ids=ids, query_embeds=queries)
    joint_mask = torch.cat([torch.ones((len(ids), q), dtype=mask.dtype), mask], dim=1)
    out = model.qformer(query_embeds=rows, query_length=q, attention_mask=joint_mask, encoder_hidden_states=embeds,
                        encoder_attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long)).last_hidden_state
    return model.itm_head(out[:, :q]).mean(dim=1)[:, 1]


def _rerank(sims: np.ndarray, k: int, score_pair: Callable[[np.ndarray, np.ndarray], np.ndarray],
            batch_size: int) -> np.ndarray:
    """Each row's top-k columns scored by `score_pair(rows, cols)` (ITM) + sims; all else UNRANKED."""
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    rows, cols = np.repeat(np.arange(len(sims)), top.shape[1]), top.ravel()
    itm = np.concatenate([score_pair(rows[c], cols[c]) for c in _chunks(len(rows), batch_size)])
    out = np.full(sims.shape, UNRANKED, np.float32)
    out[rows, cols] = itm + sims[rows, cols]
    return out


@torch.no_grad()
def retrieval_scores(model: Model, pixels: np.ndarray | torch.Tensor, ids: np.ndarray | torch.Tensor,
                     mask: np.ndarray | torch.Tensor, *, k_test: int, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sims (I, T), i2t (I, T), t2i (T, I)) as float32 numpy; `pixels` NCHW preprocessed, `ids`/`mask`
    (T, 35) Q-Former tokens; `batch_size` images, texts or pairs per forward pass."""
    model = model.eval()
    pixels, ids, mask = (torch.as_tensor(np.asarray(x)) for x in (pixels, ids, mask))
    ids, mask = ids.long(), mask.long()
    text_feats = torch.cat([text_features(model, ids[c], mask[c]) for c in _chunks(len(ids), batch_size)])
    passes = [image_pass(model, pixels[c]) for c in _chunks(len(pixels), batch_size)]
    embeds = torch.cat([e for e, _ in passes])
    image_feats = torch.cat([f for _, f in passes])
    sims = torch.einsum("iqe,te->iqt", image_feats, text_feats).amax(dim=1).numpy()
    if k_test == 0:
        return sims, sims.copy(), sims.T.copy()

    def pair(images: np.ndarray, texts: np.ndarray) -> np.ndarray:
        images, texts = torch.from_numpy(images), torch.from_numpy(texts)
        return itm_positive(model, embeds[images], ids[texts], mask[texts]).numpy()

    i2t = _rerank(sims, min(k_test, sims.shape[1]), pair, batch_size)
    t2i = _rerank(sims.T, min(k_test, sims.shape[0]), lambda t, i: pair(i, t), batch_size)
    return sims, i2t, t2i
