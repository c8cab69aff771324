"""LAVIS's stage-1 losses (spec §5.1-5.3) in PyTorch, computed with the Hugging Face BLIP-2
modules: ITC and ITM through `Blip2ForImageTextRetrieval`, ITG as a joint [queries ; text] pass
of the HF Q-Former under the multimodal-causal mask followed by BERT's LM head written from its
definition. Nothing here calls blip2_jax."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def multimodal_causal_additive(q: int, text_mask: torch.Tensor) -> torch.Tensor:
    """(B,1,Q+L,Q+L) additive mask: text sees queries and earlier real text; queries see queries."""
    b, length = text_mask.shape
    allowed = torch.zeros(b, q + length, q + length, dtype=torch.bool)
    allowed[:, :q, :q] = True
    allowed[:, q:, :q] = True
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
    allowed[:, q:, q:] = causal[None] & text_mask.bool()[:, None, :]
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None]


@torch.no_grad()
def losses(hf, lm_head: dict[str, np.ndarray], temp: float, pixels: np.ndarray, ids: np.ndarray, mask: np.ndarray,
           neg_image: np.ndarray, neg_text: np.ndarray, bos: int, pad: int, eps: float) -> dict[str, float]:
    px, ids_t, mask_t = torch.tensor(pixels), torch.tensor(ids), torch.tensor(mask)
    b = ids.shape[0]
    vision = hf.vision_model(px).last_hidden_state
    image_mask = torch.ones(vision.shape[:2], dtype=torch.long)
    queries = hf.query_tokens.expand(b, -1, -1)
    q = queries.shape[1]
    zq = hf.qformer(query_embeds=queries, encoder_hidden_states=vision, encoder_attention_mask=image_mask)
    image_feats = F.normalize(hf.vision_projection(zq.last_hidden_state), dim=-1)
    text = hf.qformer(query_embeds=hf.embeddings(input_ids=ids_t), query_length=0, attention_mask=mask_t)
    text_feat = F.normalize(hf.text_projection(text.last_hidden_state[:, 0]), dim=-1)

    sims = torch.einsum("iqe,je->ijq", image_feats, text_feat).max(-1).values
    targets = torch.arange(b)
    itc = (F.cross_entropy(sims / temp, targets, label_smoothing=eps)
           + F.cross_entropy(sims.T / temp, targets, label_smoothing=eps)) / 2

    idx = np.arange(b)
    images = np.concatenate([idx, neg_image, idx])
    texts = np.concatenate([idx, idx, neg_text])
    labels = torch.tensor([1] * b + [0] * 2 * b)
    itm_logits = hf(pixel_values=px[images], input_ids=ids_t[texts], attention_mask=mask_t[texts],
                    use_image_text_matching_head=True).logits_per_image
    itm = F.cross_entropy(itm_logits, labels)

    dec = ids_t.clone()
    dec[:, 0] = bos
    rows = hf.embeddings(input_ids=dec, query_embeds=queries)
    h = hf.qformer(query_embeds=rows, query_length=q, attention_mask=multimodal_causal_additive(q, mask_t),
                   encoder_hidden_states=vision, encoder_attention_mask=image_mask).last_hidden_state[:, q:]
    t = {k: torch.tensor(v) for k, v in lm_head.items()}
    h = F.gelu(h @ t["dense_kernel"] + t["dense_bias"])
    h = F.layer_norm(h, h.shape[-1:], t["ln_scale"], t["ln_bias"], eps=1e-12)
    logits = h @ hf.embeddings.word_embeddings.weight.T + t["bias"]
    lm_labels = dec.masked_fill(ids_t == pad, -100)
    itg = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), lm_labels[:, 1:].reshape(-1),
                          label_smoothing=eps, ignore_index=-100)
    return {"loss_itc": itc.item(), "loss_itm": itm.item(), "loss_itg": itg.item(), "itg_logits": logits.numpy()}
