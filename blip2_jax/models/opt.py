"""OPT, the frozen decoder-only LLM of BLIP-2 stage 2 (HF `OPTForCausalLM`).

Learned positions come from the attention-mask cumsum with offset 2 (`attention.position_ids_from_mask`;
padding -1, i.e. table row 1), so left-padded prompts and the masked gap after the image queries get
the positions HF gives them (spec §13.14). The LM head
is tied to `embed_tokens`. A functional KV cache (stacked over layers) supports decoding: the
caller owns the position ids and the mask over the whole cache buffer.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from blip2_jax.models import layers
from blip2_jax.models.attention import decoder_mask, dot_product_attention, prefixed_attention, token_major, \
    write_cache
from blip2_jax.models.config import OPTConfig

Dtype = Any
Cache = dict[str, jax.Array]
POSITION_OFFSET = 2  # OPT's learned positions are indexed position + 2


class OPTAttention(nn.Module):
    config: OPTConfig
    deterministic: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, cache: tuple[jax.Array, jax.Array] | None,
                 cache_index: jax.Array | None, prefix: tuple[jax.Array, jax.Array] | None = None,
                 prefix_mask: jax.Array | None = None) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        cfg = self.config
        b, t, d = x.shape
        n = cfg.num_attention_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=cfg.enable_bias)
        proj = lambda name: layers.dense(d, ("embed", "heads"), name=name, **kw)(x).reshape(b, t, n, d // n)  # noqa: E731
        q, k, v = proj("q_proj"), proj("k_proj"), proj("v_proj")
        if cache is not None:
            cache = (write_cache(cache[0], k, cache_index), write_cache(cache[1], v, cache_index))
            k, v = token_major(cache[0]), token_major(cache[1])
        if prefix is not None:  # decoding after a shared prompt (no dropout at inference)
            out = prefixed_attention(q, *cache, prefix[0], prefix[1], mask=mask, prefix_mask=prefix_mask)
        else:
            rate = cfg.attention_dropout
            rng = None if self.deterministic or rate == 0 else self.make_rng("dropout")
            out = dot_product_attention(q, k, v, mask=mask, dropout_rate=rate, dropout_rng=rng,
                                        deterministic=self.deterministic)
        out = layers.dense(d, ("heads", "embed"), name="out_proj", **kw)(out.reshape(b, t, d))
        return out, cache


class OPTDecoderLayer(nn.Module):
    config: OPTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _norm(self, name: str) -> nn.LayerNorm:
        affine = self.config.layer_norm_elementwise_affine
        return layers.layer_norm(1e-5, param_dtype=self.param_dtype, name=name, use_scale=affine, use_bias=affine)

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, cache_index: jax.Array | None,
                 cache: tuple[jax.Array, jax.Array] | None, prefix: tuple[jax.Array, jax.Array] | None,
                 prefix_mask: jax.Array | None, deterministic: bool):
        cfg = self.config
        pre = cfg.do_layer_norm_before
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        drop = lambda y: nn.Dropout(cfg.dropout)(y, deterministic=deterministic)  # noqa: E731

        h = self._norm("self_attn_layer_norm")(x).astype(self.dtype) if pre else x
        h, cache = OPTAttention(cfg, deterministic, name="self_attn", **kw)(h, mask, cache, cache_index, prefix,
                                                                            prefix_mask)
        x = x + drop(h)
        if not pre:
            x = self._norm("self_attn_layer_norm")(x).astype(self.dtype)

        h = self._norm("final_layer_norm")(x).astype(self.dtype) if pre else x
        h = layers.dense(cfg.ffn_dim, ("embed", "mlp"), name="fc1", use_bias=cfg.enable_bias, **kw)(h)
        h = layers.activation(cfg.activation_function)(h)
        h = layers.dense(cfg.hidden_size, ("mlp", "embed"), name="fc2", use_bias=cfg.enable_bias, **kw)(h)
        x = x + drop(h)
        if not pre:
            x = self._norm("final_layer_norm")(x).astype(self.dtype)
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), cache


class OPTDecoder(nn.Module):
    config: OPTConfig
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = True

    def setup(self):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed_tokens = layers.embed(cfg.vocab_size, cfg.embed_dim, ("vocab", "embed"),
                                         name="embed_tokens", **kw)
        self.embed_positions = layers.embed(cfg.max_position_embeddings + POSITION_OFFSET, cfg.hidden_size,
                                            (None, "embed"), name="embed_positions", **kw)
        self.dropout = nn.Dropout(cfg.dropout)
        stack = layers.stack_layers(OPTDecoderLayer, length=cfg.num_hidden_layers, remat_policy=self.remat_policy,
                                    in_axes=(nn.broadcast, nn.broadcast, 0, 0, nn.broadcast, nn.broadcast),
                                    static_argnums=(7,), scan=self.scan_layers)
        self.layers = stack(cfg, self.dtype, self.param_dtype)
        if cfg.embed_dim != cfg.hidden_size:
            self.project_in = layers.dense(cfg.hidden_size, ("embed", "mlp"), use_bias=False, name="project_in", **kw)
            self.project_out = layers.dense(cfg.embed_dim, ("mlp", "embed"), use_bias=False, name="project_out", **kw)
        if cfg.has_final_layer_norm:
            affine = cfg.layer_norm_elementwise_affine
            self.final_layer_norm = layers.layer_norm(1e-5, param_dtype=self.param_dtype, name="final_layer_norm",
                                                      use_scale=affine, use_bias=affine)

    def __call__(self, inputs_embeds, mask, position_ids, cache, cache_index, deterministic, logits_from=0,
                 prefix=None, prefix_mask=None):
        cfg = self.config
        h = inputs_embeds.astype(self.dtype)
        if cfg.embed_dim != cfg.hidden_size:
            h = self.project_in(h)
        h = h + self.embed_positions(position_ids + POSITION_OFFSET)
        h = self.dropout(h, deterministic=deterministic)
        kv = None if cache is None else (cache["k"], cache["v"])
        shared = None if prefix is None else (prefix["k"], prefix["v"])
        h, kv = self.layers(h, mask, cache_index, kv, shared, prefix_mask, deterministic)
        h = h[:, logits_from:]
        if cfg.has_final_layer_norm:
            h = self.final_layer_norm(h).astype(self.dtype)
        if cfg.embed_dim != cfg.hidden_size:
            h = self.project_out(h)
        logits = self.embed_tokens.attend(h.astype(self.dtype)).astype(jnp.float32)
        return logits, None if cache is None else {"k": kv[0], "v": kv[1]}


class _OPTModel(nn.Module):
    """Holds the decoder so parameter paths read `model/decoder/...` as in HF."""

    config: OPTConfig
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = True

    def setup(self):
        self.decoder = OPTDecoder(self.config, self.remat_policy, self.dtype, self.param_dtype, self.scan_layers)


class OPTForCausalLM(nn.Module):
    """Decoder-only LM; the head is `embed_tokens` transposed (tied).

    `scan_layers=False` (decoding) reads the layers as separate parameters, `DECODER_LAYERS`
    holding `layers.unstack_layers` of the scanned stack.
    """

    config: OPTConfig
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = True
    DECODER_LAYERS = ("model", "decoder", "layers")  # where the decoding steps' layer stack lies

    def setup(self):
        self.model = _OPTModel(self.config, self.remat_policy, self.dtype, self.param_dtype, self.scan_layers)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """input_ids (B,T) -> (B,T,word_embed_proj_dim)."""
        return self.model.decoder.embed_tokens(input_ids)

    def init_cache(self, batch_size: int, max_length: int) -> Cache:
        """Zero K/V buffers (layers, B, heads, max_length, head_dim); with `scan_layers=False` a list
        of one (B, heads, max_length, head_dim) buffer per layer (`attention.CACHE_ROWS_AXIS`)."""
        cfg = self.config
        return layers.zero_cache(cfg.num_hidden_layers, (batch_size, cfg.num_attention_heads, max_length,
                                                          cfg.hidden_size // cfg.num_attention_heads),
                                 self.dtype, stacked=self.scan_layers)

    def __call__(self, inputs_embeds: jax.Array, attention_mask: jax.Array, *,
                 position_ids: jax.Array | None = None, cache: Cache | None = None,
                 cache_index: jax.Array | int | None = None, deterministic: bool = True,
                 logits_from: int = 0, prefix: Cache | None = None,
                 prefix_mask: jax.Array | None = None) -> tuple[jax.Array, Cache | None]:
        """inputs_embeds (B,T,E) -> float32 logits (B,T-logits_from,V) and the updated cache.

        `logits_from` skips the LM head (the largest matmul of a small LM) at the first positions:
        the visual prompt in training, all but the last prompt token when prefilling a generation.

        Without a cache, attention_mask is (B,T) and positions follow its cumsum. With a cache,
        attention_mask is (B,S) over the whole buffer (1 = a real token, written now or before),
        the T new tokens are written at `cache_index`, and `position_ids` (B,T) must be given.
        `prefix` (a cache filled by an earlier call, one row per G consecutive rows here) and its
        key mask `prefix_mask` are attended before the cache: a beam search keeps one copy of the
        prompt per sample instead of one per beam.
        """
        mask, position_ids = decoder_mask(inputs_embeds.shape[1], attention_mask, position_ids, cache, cache_index)
        return self.model.decoder(inputs_embeds, mask, position_ids, cache, cache_index, deterministic, logits_from,
                                  prefix, prefix_mask)
