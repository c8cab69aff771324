"""Tiny random Hugging Face BLIP-2 models for parity tests (built in-process, nothing downloaded).

Sizes follow the HF test suite (spec §11.5) with 4 Q-Former layers, so the scanned groups of
(cross-attention layer, plain layer) stack more than one group; `qformer_layers` 3 or 5 gives
a Q-Former whose last group is a lone cross-attention layer (transformers builds those). Every parameter is perturbed
away from its initialisation (LayerNorm weights off 1, biases off 0, zero-initialised tensors
such as the query tokens made random) so that no mapping error can hide behind an init value.
"""
from __future__ import annotations

import numpy as np
import torch
import transformers

VISION = dict(image_size=30, patch_size=2, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=37, layer_norm_eps=1e-6)
QFORMER = dict(vocab_size=99, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37,
               max_position_embeddings=64, cross_attention_frequency=2)
OPT = dict(model_type="opt", vocab_size=99, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, ffn_dim=24,
           max_position_embeddings=64, eos_token_id=2, pad_token_id=1, bos_token_id=0, word_embed_proj_dim=16)
T5 = dict(model_type="t5", vocab_size=99, d_model=32, d_ff=37, d_kv=8, num_layers=2, num_decoder_layers=3,
          num_heads=4, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dense_act_fn="gelu",
          tie_word_embeddings=False, eos_token_id=1, pad_token_id=0, bos_token_id=1, decoder_start_token_id=0)
# grouped-query attention (6 heads over 2 K/V heads), a non-default rope_theta
LLAMA = dict(model_type="llama", vocab_size=99, hidden_size=24, intermediate_size=37, num_hidden_layers=2,
             num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
             rope_parameters=dict(rope_type="default", rope_theta=500.0), bos_token_id=1, eos_token_id=2,
             pad_token_id=0)
NUM_QUERY_TOKENS = 10
IMAGE_TOKEN_INDEX = 4


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Add N(0, scale) noise to every parameter (tied tensors once) and switch to eval mode."""
    gen = torch.Generator().manual_seed(seed)
    seen = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model.eval()


def untie_t5_head(model: torch.nn.Module, seed: int = 1) -> None:
    """transformers 5 ties T5's lm_head to `shared` for a fresh model; FlanT5 checkpoints have a
    separate head (it unties on load), so give the test model its own."""
    lm = model.language_model if hasattr(model, "language_model") else model
    gen = torch.Generator().manual_seed(seed)
    lm.lm_head.weight = torch.nn.Parameter(torch.randn(lm.lm_head.weight.shape, generator=gen) * 0.3)


def blip2_config(text: dict | None, *, image_token_index: int | None = IMAGE_TOKEN_INDEX,
                 use_qformer_text_input: bool = False, qformer_layers: int = QFORMER["num_hidden_layers"],
                 **vision_overrides) -> transformers.Blip2Config:
    return transformers.Blip2Config(
        vision_config=dict(VISION, **vision_overrides),
        qformer_config=dict(QFORMER, use_qformer_text_input=use_qformer_text_input, num_hidden_layers=qformer_layers),
        text_config=text, num_query_tokens=NUM_QUERY_TOKENS, image_text_hidden_size=24,
        image_token_index=image_token_index)


def generation_model(text: dict, seed: int = 0, qformer_layers: int = QFORMER["num_hidden_layers"]
                     ) -> transformers.Blip2ForConditionalGeneration:
    torch.manual_seed(seed)
    model = transformers.Blip2ForConditionalGeneration(blip2_config(text, qformer_layers=qformer_layers))
    if text["model_type"] == "t5":
        untie_t5_head(model)
    return perturb(model, seed)


def retrieval_model(seed: int = 0, qformer_layers: int = QFORMER["num_hidden_layers"],
                    **vision_overrides) -> transformers.Blip2ForImageTextRetrieval:
    torch.manual_seed(seed)
    cfg = blip2_config(None, image_token_index=None, use_qformer_text_input=True, qformer_layers=qformer_layers,
                       **vision_overrides)
    return perturb(transformers.Blip2ForImageTextRetrieval(cfg), seed)


def state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The model's tensors as numpy, under the names `save_pretrained` would write."""
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def pixels(batch: int, size: int = 30, seed: int = 0) -> np.ndarray:
    """Random NCHW float32 images (the torch layout); ours take them transposed to NHWC."""
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)


def nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def padded_text(lengths: list[int], total: int, vocab: int, *, left: bool = False, avoid: tuple[int, ...] = (),
                seed: int = 0, first: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (B,total) and 1/0 mask with the given real lengths, padded right (or left)."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), total), np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        tokens = rng.integers(5, vocab, n)
        tokens = np.where(np.isin(tokens, avoid), 5, tokens)
        if first is not None:
            tokens[0] = first
        span = slice(total - n, total) if left else slice(0, n)
        ids[row, span], mask[row, span] = tokens, 1
    return ids, mask
