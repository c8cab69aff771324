"""The frozen image encoders: EVA ViT-g/14 (HF `Blip2VisionModel`) and LAVIS's CLIP ViT-L/14.

Both are pre-LN ViTs with a fused qkv projection; they differ only in the patch-conv bias,
`ln_pre` (CLIP), the activation (exact GELU vs QuickGELU) and the LayerNorm eps, all read from
`VisionConfig`. The output is `post_layernorm(last block)` = LAVIS's `ln_vision(ViT(x))`.
Images are NHWC.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from blip2_jax.models import layers
from blip2_jax.models.attention import dot_product_attention
from blip2_jax.models.config import VisionConfig
from blip2_jax.models.interpolate import interpolate_position_embedding

Dtype = Any


class VisionEmbeddings(nn.Module):
    """Patch conv + [CLS] + learned absolute positions (interpolated for other resolutions)."""

    config: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array, interpolate_pos_encoding: bool = False) -> jax.Array:
        """pixel_values (B,H,W,3) -> (B, 1 + H/p * W/p, D)."""
        cfg = self.config
        d, p = cfg.hidden_size, cfg.patch_size
        if pixel_values.ndim != 4 or pixel_values.shape[-1] != 3:
            raise ValueError(f"pixel_values must be (batch, height, width, 3) NHWC, got {pixel_values.shape}")
        patches = nn.Conv(
            d, (p, p), strides=(p, p), padding="VALID", use_bias=cfg.variant == "eva",
            dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=layers.partitioned(layers.default_init, (None, None, None, "embed")),
            bias_init=layers.partitioned(nn.initializers.zeros_init(), ("embed",)),
            name="patch_embedding")(pixel_values.astype(self.dtype))
        b, gh, gw, _ = patches.shape
        cls = self.param("class_embedding", layers.partitioned(layers.default_init, (None, None, "embed")),
                         (1, 1, d), self.param_dtype)
        pos = self.param("position_embedding", layers.partitioned(layers.default_init, (None, None, "embed")),
                         (1, cfg.num_positions, d), self.param_dtype)
        if (gh, gw) != (cfg.grid, cfg.grid):
            if not interpolate_pos_encoding:
                raise ValueError(
                    f"image of {pixel_values.shape[1]}x{pixel_values.shape[2]} px gives a {gh}x{gw} patch grid but "
                    f"the model was built for {cfg.image_size} px ({cfg.grid}x{cfg.grid}); pass "
                    "interpolate_pos_encoding=True or use a config with the matching image_size")
            pos = interpolate_position_embedding(pos, (gh, gw), align_corners=cfg.variant == "clip")
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, d)),
                             patches.reshape(b, gh * gw, d)], axis=1)
        return x + pos.astype(self.dtype)


class VisionAttention(nn.Module):
    """Fused-qkv multi-head self-attention (EVA: k-bias slice is zero in the checkpoint)."""

    config: VisionConfig
    deterministic: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        b, t, d = x.shape
        n = cfg.num_attention_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        qkv = layers.dense(3 * d, ("embed", "heads"), name="qkv", **kw)(x).reshape(b, t, 3, n, d // n)
        rng = None if self.deterministic or cfg.attention_dropout == 0 else self.make_rng("dropout")
        out = dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2],
                                    dropout_rate=cfg.attention_dropout, dropout_rng=rng,
                                    deterministic=self.deterministic)
        return layers.dense(d, ("heads", "embed"), name="projection", **kw)(out.reshape(b, t, d))


class VisionMLP(nn.Module):
    config: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layers.dense(self.config.intermediate_size, ("embed", "mlp"), name="fc1", **kw)(x)
        h = layers.activation(self.config.hidden_act)(h)
        return layers.dense(self.config.hidden_size, ("mlp", "embed"), name="fc2", **kw)(h)


class VisionLayer(nn.Module):
    """Pre-LN block: x + attn(LN1(x)); x + mlp(LN2(x))."""

    config: VisionConfig
    deterministic: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, None]:
        eps, pdt = self.config.layer_norm_eps, self.param_dtype
        kw = dict(dtype=self.dtype, param_dtype=pdt)
        h = layers.layer_norm(eps, param_dtype=pdt, name="layer_norm1")(x).astype(self.dtype)
        x = x + VisionAttention(self.config, self.deterministic, name="self_attn", **kw)(h)
        h = layers.layer_norm(eps, param_dtype=pdt, name="layer_norm2")(x).astype(self.dtype)
        x = x + VisionMLP(self.config, name="mlp", **kw)(h)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return x, None


class VisionEncoder(nn.Module):
    config: VisionConfig
    deterministic: bool = True
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        stack = layers.stack_layers(VisionLayer, length=self.config.num_hidden_layers,
                                    remat_policy=self.remat_policy)
        x, _ = stack(self.config, self.deterministic, self.dtype, self.param_dtype, name="layers")(x)
        return x


class VisionModel(nn.Module):
    """Image (B,H,W,3) -> `post_layernorm(ViT(image))` (B, 1 + patches, D)."""

    config: VisionConfig
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array, *, interpolate_pos_encoding: bool = False,
                 deterministic: bool = True) -> jax.Array:
        cfg, pdt = self.config, self.param_dtype
        kw = dict(dtype=self.dtype, param_dtype=pdt)
        x = VisionEmbeddings(cfg, name="embeddings", **kw)(pixel_values, interpolate_pos_encoding)
        if cfg.variant == "clip":  # CLIP's ln_pre; EVA has none
            x = layers.layer_norm(cfg.layer_norm_eps, param_dtype=pdt, name="pre_layernorm")(x).astype(self.dtype)
        x = VisionEncoder(cfg, deterministic, self.remat_policy, name="encoder", **kw)(x)
        return layers.layer_norm(cfg.ln_vision_eps, param_dtype=pdt, name="post_layernorm")(x).astype(self.dtype)
