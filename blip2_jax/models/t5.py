"""T5 / FlanT5 encoder-decoder language model, numerically matching Hugging Face `transformers`.

BLIP-2 FlanT5 feeds the encoder `inputs_embeds` (projected image queries in front of the prompt
embeddings) and decodes with the T5 decoder. The parameter tree mirrors the Hugging Face module
tree (`shared`, `encoder/block/layer_0/SelfAttention/q`, ...) so `weights/hf_names.py` maps names by
pattern; each stack's blocks are scanned (parameters stacked on a leading `layers` axis).

T5 specifics: RMS layer norms in float32, unscaled dot-product attention plus a learned
relative-position bias (computed once per stack by its first layer's table and shared by all
layers), gated or plain FFN, and, for original T5 (`scale_decoder_outputs`), decoder outputs scaled
by d_model**-0.5 before the head. Incremental decoding writes self-attention K/V into a
fixed-size cache at `cache_index`.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from blip2_jax.models import attention, layers
from blip2_jax.models.config import T5Config

Dtype = Any
Cache = dict[str, jax.Array]


def _normal(fan: int) -> nn.initializers.Initializer:
    """Mesh-TensorFlow T5 initialiser: normal with stddev fan**-0.5."""
    return nn.initializers.normal(stddev=fan ** -0.5)


def relative_position_bucket(relative_position: jax.Array, *, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> jax.Array:
    """Bucket of each (key - query) distance: exact for small distances, log-spaced up to max_distance."""
    buckets = 0
    if bidirectional:
        num_buckets //= 2
        buckets = (relative_position > 0).astype(relative_position.dtype) * num_buckets
        distance = jnp.abs(relative_position)
    else:  # keys after the query (masked anyway) share bucket 0
        distance = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    # Clamped at 1 so the log is finite where the exact branch is taken anyway.
    log_ratio = (jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
                 / math.log(max_distance / max_exact))
    large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(relative_position.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(distance < max_exact, distance, large)


def _key_mask(mask: jax.Array | None) -> jax.Array | None:
    return None if mask is None else attention.padding_mask(mask)


def shift_right(labels: jax.Array, decoder_start_token_id: int, pad_token_id: int) -> jax.Array:
    """Decoder inputs (B,T) from labels (B,T): prepend the start token, drop the last, -100 -> pad."""
    start = jnp.full(labels.shape[:-1] + (1,), decoder_start_token_id, labels.dtype)
    shifted = jnp.concatenate([start, labels[..., :-1]], axis=-1)
    return jnp.where(shifted == -100, pad_token_id, shifted)


class T5Attention(nn.Module):
    """Multi-head attention without scaling; optionally writes K/V into a cache at `cache_index`."""

    config: T5Config
    deterministic: bool
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array, kv: jax.Array, bias: jax.Array | None, mask: jax.Array | None,
                 cache: Cache | None = None, cache_index: jax.Array | None = None
                 ) -> tuple[jax.Array, Cache | None]:
        """x (B,T,D), kv (B,S,D) -> (B,T,D); with `cache` ({'k','v'}: (B,N,L,H)) also the updated cache.

        `kv` may instead be cross-attention memory ({'k','v'}: (B',S,N,H) from
        `T5ForConditionalGeneration.cross_memory`) shared by groups of B/B' consecutive rows (the
        beams of one sample): no K/V projection then, and no copy of it per beam.
        """
        cfg = self.config
        inner = cfg.num_heads * cfg.d_kv
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False)

        def heads(name: str, inputs: jax.Array, std_fan: int) -> jax.Array:
            out = layers.dense(inner, ("embed", "heads"), name=name, kernel_init=_normal(std_fan), **kw)(inputs)
            return out.reshape(out.shape[:-1] + (cfg.num_heads, cfg.d_kv))

        def output(out: jax.Array) -> jax.Array:
            out = out.reshape(out.shape[:-2] + (inner,))
            return layers.dense(cfg.d_model, ("heads", "embed"), name="o", kernel_init=_normal(inner), **kw)(out)

        q = heads("q", x, cfg.d_model * cfg.d_kv)
        rng = None if self.deterministic or cfg.dropout_rate == 0.0 else self.make_rng("dropout")
        if isinstance(kv, dict):  # cross-attention memory: each sample's rows attend to it as one query block
            b, t = x.shape[:2]
            samples = kv["k"].shape[0]
            grouped = q.reshape(samples, (b // samples) * t, *q.shape[2:])
            out = attention.dot_product_attention(grouped, kv["k"], kv["v"], mask=mask, scale=1.0,
                                                  dropout_rate=cfg.dropout_rate, dropout_rng=rng,
                                                  deterministic=self.deterministic).reshape(q.shape)
            return output(out), cache
        k = heads("k", kv, cfg.d_model)
        v = heads("v", kv, cfg.d_model)
        if cache is not None:
            cache = {"k": attention.write_cache(cache["k"], k, cache_index),
                     "v": attention.write_cache(cache["v"], v, cache_index)}
            k, v = attention.token_major(cache["k"]), attention.token_major(cache["v"])
        out = attention.dot_product_attention(q, k, v, mask=mask, bias=bias, scale=1.0,
                                              dropout_rate=cfg.dropout_rate, dropout_rng=rng,
                                              deterministic=self.deterministic)
        return output(out), cache


class T5LayerAttention(nn.Module):
    """Pre-norm residual attention sublayer: `SelfAttention`, or `EncDecAttention` when `cross`."""

    config: T5Config
    deterministic: bool
    dtype: Dtype
    param_dtype: Dtype
    cross: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, kv: jax.Array | None, bias: jax.Array | None, mask: jax.Array | None,
                 cache: Cache | None = None, cache_index: jax.Array | None = None
                 ) -> tuple[jax.Array, Cache | None]:
        """x (B,T,D); kv (B,S,D) for cross-attention (None: attend to the normed x)."""
        kw = dict(config=self.config, deterministic=self.deterministic, dtype=self.dtype,
                  param_dtype=self.param_dtype)
        h = layers.RMSNorm(self.config.layer_norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="layer_norm")(x)
        name = "EncDecAttention" if self.cross else "SelfAttention"
        h, cache = T5Attention(**kw, name=name)(h, h if kv is None else kv, bias, mask, cache, cache_index)
        return x + nn.Dropout(self.config.dropout_rate)(h, deterministic=self.deterministic), cache


class T5DenseActDense(nn.Module):
    """FFN `wo(act(wi_0 x) * wi_1 x)` when gated, else `wo(act(wi x))`, dropout before `wo`."""

    config: T5Config
    deterministic: bool
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x (B,T,D) -> (B,T,D)."""
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False)
        act = layers.activation(cfg.dense_act_fn)

        def wi(name: str) -> jax.Array:
            return layers.dense(cfg.d_ff, ("embed", "mlp"), name=name, kernel_init=_normal(cfg.d_model), **kw)(x)

        h = act(wi("wi_0")) * wi("wi_1") if cfg.is_gated_act else act(wi("wi"))
        h = nn.Dropout(cfg.dropout_rate)(h, deterministic=self.deterministic)
        return layers.dense(cfg.d_model, ("mlp", "embed"), name="wo", kernel_init=_normal(cfg.d_ff), **kw)(h)


class T5LayerFF(nn.Module):
    """Pre-norm residual FFN sublayer."""

    config: T5Config
    deterministic: bool
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x (B,T,D) -> (B,T,D)."""
        h = layers.RMSNorm(self.config.layer_norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="layer_norm")(x)
        h = T5DenseActDense(self.config, self.deterministic, self.dtype, self.param_dtype,
                            name="DenseReluDense")(h)
        return x + nn.Dropout(self.config.dropout_rate)(h, deterministic=self.deterministic)


class T5Block(nn.Module):
    """One encoder (self-attn, FFN) or decoder (self-attn, cross-attn, FFN) block, scan-compatible."""

    config: T5Config
    deterministic: bool
    dtype: Dtype
    param_dtype: Dtype
    is_decoder: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, mask: jax.Array | None,
                 encoder_hidden_states: jax.Array | None = None, encoder_mask: jax.Array | None = None,
                 cache: Cache | None = None, cache_index: jax.Array | None = None, memory: Cache | None = None
                 ) -> tuple[jax.Array, Cache | None]:
        """x (B,T,D) -> (x, this layer's updated cache or None); cross-attention reads this layer's
        `memory` when given, else projects `encoder_hidden_states`."""
        kw = dict(config=self.config, deterministic=self.deterministic, dtype=self.dtype,
                  param_dtype=self.param_dtype)
        x, cache = T5LayerAttention(**kw, name="layer_0")(x, None, bias, mask, cache, cache_index)
        if self.is_decoder:
            x, _ = T5LayerAttention(**kw, cross=True, name="layer_1")(
                x, encoder_hidden_states if memory is None else memory, None, encoder_mask)
        x = T5LayerFF(**kw, name=f"layer_{2 if self.is_decoder else 1}")(x)
        return x, cache


class T5Stack(nn.Module):
    """Encoder or decoder stack: relative-position bias, scanned blocks, final layer norm."""

    config: T5Config
    is_decoder: bool
    dtype: Dtype
    param_dtype: Dtype
    remat_policy: str = "none"
    scan_layers: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, attention_mask: jax.Array | None,
                 encoder_hidden_states: jax.Array | None = None, encoder_attention_mask: jax.Array | None = None,
                 cache: Cache | None = None, cache_index: jax.Array | None = None, memory: Cache | None = None,
                 *, deterministic: bool) -> tuple[jax.Array, Cache | None]:
        """x (B,T,D) embeddings -> (B,T,D) hidden states and the updated cache (decoder only).

        `attention_mask` (B,T) 1/0 key padding, or (B,L) over the cache slots when `cache` is given.
        `memory` (decoder, from `T5ForConditionalGeneration.cross_memory`) replaces
        `encoder_hidden_states` in every layer's cross-attention.
        """
        cfg = self.config
        length = x.shape[1]
        key_length = length if cache is None else attention.cache_shape(cache)[1]
        offset = 0 if cache is None else cache_index
        # Relative position bias for query positions offset+t, shared by every layer: (1,N,T,S).
        relative = jnp.arange(key_length)[None, :] - (jnp.arange(length)[:, None] + offset)
        buckets = relative_position_bucket(relative, bidirectional=not self.is_decoder,
                                           num_buckets=cfg.relative_attention_num_buckets,
                                           max_distance=cfg.relative_attention_max_distance)
        table = layers.embed(cfg.relative_attention_num_buckets, cfg.num_heads, ("relpos_buckets", "heads"),
                             dtype=self.dtype, param_dtype=self.param_dtype, init=_normal(cfg.d_model),
                             name="relative_attention_bias")
        bias = jnp.transpose(table(buckets), (2, 0, 1))[None]
        mask = attention.combine_masks(
            attention.causal_mask(length, key_length, offset) if self.is_decoder else None, _key_mask(attention_mask))

        args: tuple = (bias, mask)
        in_axes: tuple = (nn.broadcast, nn.broadcast)
        if self.is_decoder:
            args += (encoder_hidden_states, _key_mask(encoder_attention_mask), cache, cache_index, memory)
            in_axes += (nn.broadcast, nn.broadcast, 0, nn.broadcast, 0)
        blocks = layers.stack_layers(T5Block, length=cfg.decoder_layers if self.is_decoder else cfg.num_layers,
                                     remat_policy=self.remat_policy, in_axes=in_axes, scan=self.scan_layers)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        x, cache = blocks(cfg, deterministic, self.dtype, self.param_dtype, is_decoder=self.is_decoder,
                          name="block")(x, *args)
        x = layers.RMSNorm(cfg.layer_norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="final_layer_norm")(x)
        return nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic), cache


class T5ForConditionalGeneration(nn.Module):
    """T5 encoder-decoder with an untied `lm_head` (HF `T5ForConditionalGeneration`).

    `scan_layers=False` (decoding) reads the decoder's blocks as separate parameters,
    `DECODER_LAYERS` holding `layers.unstack_layers` of the scanned stack; the encoder, run once,
    stays scanned.
    """

    config: T5Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat_policy: str = "none"
    scan_layers: bool = True
    DECODER_LAYERS = ("decoder", "block")  # where the decoding steps' layer stack lies

    def setup(self) -> None:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.shared = layers.embed(cfg.vocab_size, cfg.d_model, ("vocab", "embed"), init=_normal(1), name="shared",
                                   **kw)
        self.encoder = T5Stack(cfg, False, remat_policy=self.remat_policy, **kw)
        self.decoder = T5Stack(cfg, True, remat_policy=self.remat_policy, scan_layers=self.scan_layers, **kw)
        self.lm_head = layers.dense(cfg.vocab_size, ("embed", "vocab"), use_bias=False, kernel_init=_normal(1),
                                    name="lm_head", **kw)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Token ids (B,T) -> shared embeddings (B,T,D)."""
        return self.shared(input_ids)

    def encode(self, inputs_embeds: jax.Array, attention_mask: jax.Array | None, *,
               deterministic: bool = True) -> jax.Array:
        """inputs_embeds (B,S,D), attention_mask (B,S) 1/0 -> encoder hidden states (B,S,D)."""
        return self.encoder(inputs_embeds.astype(self.dtype), attention_mask, deterministic=deterministic)[0]

    def decode(self, decoder_input_ids: jax.Array, encoder_hidden_states: jax.Array | None,
               encoder_attention_mask: jax.Array, *, decoder_attention_mask: jax.Array | None = None,
               cache: Cache | None = None, cache_index: jax.Array | int | None = None,
               memory: Cache | None = None, deterministic: bool = True) -> tuple[jax.Array, Cache | None]:
        """decoder_input_ids (B,T), encoder states (B,S,D) and mask (B,S) -> (logits (B,T,V) f32, cache).

        Self-attention is causal. With `cache` (from `init_cache`, max length L) the T tokens sit at
        absolute positions cache_index+t, their K/V are written there and `decoder_attention_mask`,
        if given, is (B,L) over the cache slots; without it, (B,T). The cache comes back updated
        (None when none was given). With `memory` (`cross_memory` of B' = B/G samples; the encoder
        states are then not needed) each group of G consecutive rows reads its sample's memory and
        `encoder_attention_mask` is (B',S).
        """
        if cache is not None and cache_index is None:
            raise ValueError("decode with a cache needs cache_index (the position of the first new token)")
        x, cache = self.decoder(self.shared(decoder_input_ids), decoder_attention_mask, encoder_hidden_states,
                                encoder_attention_mask, cache, cache_index, memory, deterministic=deterministic)
        if self.config.scale_decoder_outputs:  # original T5 rescales before its (tied) head
            x = x * self.config.d_model ** -0.5
        return self.lm_head(x).astype(jnp.float32), cache

    def cross_memory(self, encoder_hidden_states: jax.Array) -> Cache:
        """Every decoder layer's cross-attention K and V of the encoder states, {'k','v'}: (layers, B,
        S, N, H), or per-layer lists with `scan_layers=False`. They depend on the encoder alone:
        generation computes them once, not at every step for every beam (`decode(memory=...)`)."""
        cfg = self.config
        blocks = self.decoder.variables["params"]["block"]
        x = encoder_hidden_states.astype(self.dtype)

        def project(kernel: jax.Array) -> jax.Array:  # what EncDecAttention's k/v Dense computes
            out = jnp.einsum("bsd,...di->...bsi", x, kernel.astype(self.dtype))
            return out.reshape(out.shape[:-1] + (cfg.num_heads, cfg.d_kv))

        def kernels(name: str) -> Any:
            if self.scan_layers:
                return blocks["layer_1"]["EncDecAttention"][name]["kernel"]
            return [layers.dense_kernel(blocks[str(i)]["layer_1"]["EncDecAttention"][name])
                    for i in range(cfg.decoder_layers)]

        return {name: jax.tree.map(project, kernels(name)) for name in ("k", "v")}

    def init_cache(self, batch_size: int, max_length: int) -> Cache:
        """Zero self-attention K/V cache: {'k','v'}: (num_decoder_layers, B, N, max_length, H); with
        `scan_layers=False` a list of one (B, N, max_length, H) buffer per layer (`attention.CACHE_ROWS_AXIS`)."""
        cfg = self.config
        return layers.zero_cache(cfg.decoder_layers, (batch_size, cfg.num_heads, max_length, cfg.d_kv), self.dtype,
                                 stacked=self.scan_layers)

    def __call__(self, inputs_embeds: jax.Array, attention_mask: jax.Array | None,
                 decoder_input_ids: jax.Array, decoder_attention_mask: jax.Array | None = None, *,
                 deterministic: bool = True) -> jax.Array:
        """inputs_embeds (B,S,D), attention_mask (B,S), decoder_input_ids (B,T) -> logits (B,T,V) f32."""
        hidden = self.encode(inputs_embeds, attention_mask, deterministic=deterministic)
        return self.decode(decoder_input_ids, hidden, attention_mask, decoder_attention_mask=decoder_attention_mask,
                           deterministic=deterministic)[0]
