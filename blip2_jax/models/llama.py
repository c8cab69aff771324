"""LLaMA-family decoder (HF `LlamaForCausalLM`): LLaMA, Vicuna and the models transformers builds
from a `LlamaConfig`; the frozen LLM of InstructBLIP-Vicuna, and any BLIP-2 text model of that type.

Pre-norm blocks with RMSNorm (variance in float32), rotary positions on queries and keys (HF's
rotate-half layout and every scaling of `config.ROPE_TYPES`), grouped-query attention (`num_key_value_heads`
K/V heads shared by groups of query heads; the cache holds only those), a SwiGLU MLP, and an untied
head unless `tie_word_embeddings`. Positions come from the attention-mask cumsum
(`attention.position_ids_from_mask`), as `generate` gives them on real tokens, so a left-padded
row computes what it computes alone (HF's forward without `position_ids` counts padding too; the
tests pass it the same positions).
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from blip2_jax.models import layers
from blip2_jax.models.attention import decoder_mask, dot_product_attention, prefixed_attention, token_major, \
    write_cache
from blip2_jax.models.config import LlamaConfig

Dtype = Any
Cache = dict[str, jax.Array]


def _default_inv_freq(dim: int, base: float | jax.Array) -> np.ndarray | jax.Array:
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    return 1.0 / (base ** exponents) if isinstance(base, jax.Array) else \
        (np.float32(1.0) / (np.float32(base) ** exponents)).astype(np.float32)


def _yarn(cfg: LlamaConfig, dim: int) -> tuple[np.ndarray, float]:
    """YaRN (arXiv 2309.00071): per-frequency blend of interpolation and extrapolation, and a
    cos/sin scale, as transformers computes them."""
    base, factor = cfg.rope_theta, cfg.rope_factor
    original = cfg.rope_original_max_position_embeddings
    if factor is None:
        factor = cfg.max_position_embeddings / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = cfg.rope_attention_factor
    if attention is None:
        attention = (mscale(factor, cfg.rope_mscale) / mscale(factor, cfg.rope_mscale_all_dim)
                     if cfg.rope_mscale and cfg.rope_mscale_all_dim else mscale(factor))

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(cfg.rope_beta_fast or 32), correction_dim(cfg.rope_beta_slow or 1)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if low == high else high
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation = 1 - ramp
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv.astype(np.float32), float(attention)


def _llama3(cfg: LlamaConfig, dim: int) -> np.ndarray:
    """Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth blend between."""
    inv = _default_inv_freq(dim, cfg.rope_theta)
    factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    original = cfg.rope_original_max_position_embeddings
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > original / low, inv / factor, inv)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < original / high) & ~(wavelen > original / low)
    return np.where(medium, blended, scaled).astype(np.float32)


def rotary_frequencies(cfg: LlamaConfig, max_position: jax.Array | None = None) -> tuple[Any, float]:
    """(inverse frequencies (head_dim/2,), cos/sin scale) of `cfg.rope_type`. 'dynamic' (NTK) grows
    the base with the longest position in use (`max_position`, traced), past max_position_embeddings."""
    dim = cfg.head_dim
    if cfg.rope_type == "default":
        return _default_inv_freq(dim, cfg.rope_theta), 1.0
    if cfg.rope_type == "linear":
        return _default_inv_freq(dim, cfg.rope_theta) / np.float32(cfg.rope_factor), 1.0
    if cfg.rope_type == "llama3":
        return _llama3(cfg, dim), 1.0
    if cfg.rope_type == "yarn":
        return _yarn(cfg, dim)
    # dynamic NTK: seq_len = max(longest position + 1, max_position_embeddings)
    seq_len = jnp.maximum(max_position.astype(jnp.float32) + 1, cfg.max_position_embeddings)
    factor = cfg.rope_factor
    base = cfg.rope_theta * ((factor * seq_len / cfg.max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
    return _default_inv_freq(dim, base), 1.0


def rotary_cos_sin(cfg: LlamaConfig, position_ids: jax.Array, dtype: Dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin (B,T,head_dim) for `position_ids` (B,T), in `dtype` as transformers casts them."""
    inv_freq, scale = rotary_frequencies(cfg, jnp.max(position_ids) if cfg.rope_type == "dynamic" else None)
    freqs = position_ids.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return (jnp.cos(angles) * scale).astype(dtype), (jnp.sin(angles) * scale).astype(dtype)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x (B,T,N,H) rotated: x * cos + rotate_half(x) * sin, rotate_half = [-x2, x1]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


class LlamaAttention(nn.Module):
    config: LlamaConfig
    deterministic: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cos_sin: tuple[jax.Array, jax.Array], mask: jax.Array,
                 cache: tuple[jax.Array, jax.Array] | None, cache_index: jax.Array | None,
                 prefix: tuple[jax.Array, jax.Array] | None = None,
                 prefix_mask: jax.Array | None = None) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        cfg = self.config
        b, t, _ = x.shape
        n, kv, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=cfg.attention_bias)
        q = layers.dense(n * h, ("embed", "heads"), name="q_proj", **kw)(x).reshape(b, t, n, h)
        k = layers.dense(kv * h, ("embed", "heads"), name="k_proj", **kw)(x).reshape(b, t, kv, h)
        v = layers.dense(kv * h, ("embed", "heads"), name="v_proj", **kw)(x).reshape(b, t, kv, h)
        q, k = apply_rotary(q, *cos_sin), apply_rotary(k, *cos_sin)
        if cache is not None:  # keys are cached rotated, at the positions they were written with
            cache = (write_cache(cache[0], k, cache_index), write_cache(cache[1], v, cache_index))
            k, v = token_major(cache[0]), token_major(cache[1])
        if prefix is not None:  # decoding after a shared prompt (no dropout at inference)
            out = prefixed_attention(q, *cache, prefix[0], prefix[1], mask=mask, prefix_mask=prefix_mask)
        else:  # grouped K/V heads read in place, with or without dropout
            rate = cfg.attention_dropout
            rng = None if self.deterministic or rate == 0 else self.make_rng("dropout")
            out = dot_product_attention(q, k, v, mask=mask, dropout_rate=rate, dropout_rng=rng,
                                        deterministic=self.deterministic)
        out = layers.dense(cfg.hidden_size, ("heads", "embed"), name="o_proj", **kw)(out.reshape(b, t, n * h))
        return out, cache


def _rms_norm(cfg: LlamaConfig, name: str | None, kw: dict[str, Any]) -> layers.RMSNorm:
    """HF `LlamaRMSNorm`: x / rms(x) in float32, cast back to the input dtype, times the weight."""
    return layers.RMSNorm(cfg.rms_norm_eps, cast_to_input=True, name=name, **kw)


class LlamaMLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x))."""

    config: LlamaConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=cfg.mlp_bias)
        gate = layers.dense(cfg.intermediate_size, ("embed", "mlp"), name="gate_proj", **kw)(x)
        up = layers.dense(cfg.intermediate_size, ("embed", "mlp"), name="up_proj", **kw)(x)
        return layers.dense(cfg.hidden_size, ("mlp", "embed"), name="down_proj", **kw)(
            layers.activation(cfg.hidden_act)(gate) * up)


class LlamaDecoderLayer(nn.Module):
    config: LlamaConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cos_sin: tuple[jax.Array, jax.Array], mask: jax.Array,
                 cache_index: jax.Array | None, cache: tuple[jax.Array, jax.Array] | None,
                 prefix: tuple[jax.Array, jax.Array] | None, prefix_mask: jax.Array | None, deterministic: bool):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h, cache = LlamaAttention(cfg, deterministic, name="self_attn", **kw)(
            _rms_norm(cfg, "input_layernorm", kw)(x), cos_sin, mask, cache, cache_index,
            prefix, prefix_mask)
        x = x + h
        h = LlamaMLP(cfg, name="mlp", **kw)(_rms_norm(cfg, "post_attention_layernorm", kw)(x))
        return nn.with_logical_constraint(x + h, ("batch", "length", "embed")), cache


class _LlamaModel(nn.Module):
    """`model/...` as in HF: embeddings, the layer stack, the final norm."""

    config: LlamaConfig
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = True

    def setup(self):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed_tokens = layers.embed(cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"), name="embed_tokens",
                                         **kw)
        stack = layers.stack_layers(LlamaDecoderLayer, length=cfg.num_hidden_layers, remat_policy=self.remat_policy,
                                    in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, 0, nn.broadcast,
                                             nn.broadcast),  # per layer: its cache and its prefix K/V
                                    static_argnums=(8,), scan=self.scan_layers)
        self.layers = stack(cfg, self.dtype, self.param_dtype)
        self.norm = _rms_norm(cfg, None, kw)  # named by the attribute

    def __call__(self, h, cos_sin, mask, cache, cache_index, deterministic, prefix, prefix_mask):
        kv = None if cache is None else (cache["k"], cache["v"])
        shared = None if prefix is None else (prefix["k"], prefix["v"])
        h, kv = self.layers(h, cos_sin, mask, cache_index, kv, shared, prefix_mask, deterministic)
        return self.norm(h), None if cache is None else {"k": kv[0], "v": kv[1]}


class LlamaForCausalLM(nn.Module):
    """Decoder-only LM with the interface of `opt.OPTForCausalLM` (embed, init_cache, a call with
    an optional cache and shared prefix), so BLIP-2 and the decoding loop take either.

    `scan_layers=False` (decoding) reads the layers as separate parameters, `DECODER_LAYERS`
    holding `layers.unstack_layers` of the scanned stack.
    """

    config: LlamaConfig
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = True
    DECODER_LAYERS = ("model", "layers")  # where the decoding steps' layer stack lies

    def setup(self):
        cfg = self.config
        self.model = _LlamaModel(cfg, self.remat_policy, self.dtype, self.param_dtype, self.scan_layers)
        if not cfg.tie_word_embeddings:
            self.lm_head = layers.dense(cfg.vocab_size, ("embed", "vocab"), use_bias=False, name="lm_head",
                                        dtype=self.dtype, param_dtype=self.param_dtype)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """input_ids (B,T) -> (B,T,hidden_size)."""
        return self.model.embed_tokens(input_ids)

    def init_cache(self, batch_size: int, max_length: int) -> Cache:
        """Zero K/V buffers of the K/V heads (layers, B, num_key_value_heads, max_length, head_dim);
        with `scan_layers=False` a list of one buffer per layer (`attention.CACHE_ROWS_AXIS`)."""
        cfg = self.config
        return layers.zero_cache(cfg.num_hidden_layers, (batch_size, cfg.num_key_value_heads, max_length,
                                                          cfg.head_dim), self.dtype, stacked=self.scan_layers)

    def __call__(self, inputs_embeds: jax.Array, attention_mask: jax.Array, *,
                 position_ids: jax.Array | None = None, cache: Cache | None = None,
                 cache_index: jax.Array | int | None = None, deterministic: bool = True,
                 logits_from: int = 0, prefix: Cache | None = None,
                 prefix_mask: jax.Array | None = None) -> tuple[jax.Array, Cache | None]:
        """inputs_embeds (B,T,D) -> float32 logits (B,T-logits_from,V) and the updated cache; the
        arguments mean what they mean for `OPTForCausalLM.__call__`."""
        mask, position_ids = decoder_mask(inputs_embeds.shape[1], attention_mask, position_ids, cache, cache_index)
        if self.is_initializing():  # an untied model reads its input table only in `embed`
            self.embed(jnp.zeros((1, 1), jnp.int32))
        h = inputs_embeds.astype(self.dtype)
        cos_sin = rotary_cos_sin(self.config, position_ids, self.dtype)
        h, cache = self.model(h, cos_sin, mask, cache, cache_index, deterministic, prefix, prefix_mask)
        h = h[:, logits_from:]
        logits = self.lm_head(h) if not self.config.tie_word_embeddings else self.model.embed_tokens.attend(h)
        return logits.astype(jnp.float32), cache
