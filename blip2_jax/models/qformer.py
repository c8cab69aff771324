"""The Querying Transformer (Q-Former): post-LN BERT layers over [queries ; text].

Self-attention is shared by the query and text rows; every `cross_attention_frequency`-th layer
(0, 2, 4, ...) adds cross-attention to the image for the query rows only; query and text rows
have separate feed-forwards. Layers are scanned in groups of f = `cross_attention_frequency` (the
first of each group has cross-attention), so the parameter tree is `encoder/layers/layer_{j}/...`
stacked over the G full groups (HF layer index = group * f + j). A depth that is not a multiple
of f (transformers builds e.g. 3 layers with f = 2) ends in one shorter group, not scanned:
`encoder/remainder/layer_{j}/...` is HF layer G * f + j.
An optional per-layer self-attention key/value prefix lets ITG attend to the query-only pass's
keys/values without recomputing the queries (spec §5.3).

Precision (design decision 6): the residual stream between layers — the input rows, every
`LayerNorm(dense(x) + residual)` and so every LayerNorm input — is float32 whatever the compute
dtype; the projections and feed-forwards compute in `dtype` (bf16 on accelerators) and their
outputs are added to the float32 residual. This is what LAVIS's autocast training does (its
LayerNorms return fp32 and a half-precision Linear output added to them gives fp32).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from blip2_jax.models import layers
from blip2_jax.models.attention import dot_product_attention, padding_mask
from blip2_jax.models.config import QFormerConfig

Dtype = Any
KV = tuple[jax.Array, jax.Array]


class QFormerTextEmbeddings(nn.Module):
    """Word + absolute position embeddings of the Q-Former's text (no LayerNorm: that is the
    Q-Former's `layernorm`, shared with the queries). HF `Blip2TextEmbeddings`. The word table is
    also the decoder of the stage-1 LM head (`attend`). The embeddings start the float32 residual
    stream; `attend` computes in `dtype`."""

    config: QFormerConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        kw = dict(dtype=jnp.float32, param_dtype=self.param_dtype)
        self.word_embeddings = layers.embed(cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"),
                                            name="word_embeddings", **kw)
        self.position_embeddings = layers.embed(cfg.max_position_embeddings, cfg.hidden_size, (None, "embed"),
                                                name="position_embeddings", **kw)

    def __call__(self, input_ids: jax.Array, position_offset: int = 0) -> jax.Array:
        """input_ids (B,L) -> (B,L,D); positions start at `position_offset` (0 in BLIP-2)."""
        if input_ids.shape[1] + position_offset > self.config.max_position_embeddings:
            raise ValueError(f"text of length {input_ids.shape[1]} exceeds the Q-Former's "
                             f"{self.config.max_position_embeddings} positions")
        pos = jnp.arange(input_ids.shape[1]) + position_offset
        return self.word_embeddings(input_ids) + self.position_embeddings(pos)[None]

    def attend(self, hidden: jax.Array) -> jax.Array:
        """hidden (B,L,D) -> scores against every word embedding (B,L,V) (the tied LM decoder)."""
        table = self.word_embeddings.embedding.astype(self.dtype)
        return jnp.dot(hidden.astype(self.dtype), table.T)


class ResidualOutput(nn.Module):
    """BERT's `*Output`: LayerNorm(dropout(dense(x)) + residual), float32 (the residual stream)."""

    config: QFormerConfig
    deterministic: bool = True
    in_axis: str = "heads"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, residual: jax.Array) -> jax.Array:
        cfg = self.config
        h = layers.dense(cfg.hidden_size, (self.in_axis, "embed"), name="dense", dtype=self.dtype,
                         param_dtype=self.param_dtype)(x)
        h = nn.Dropout(cfg.hidden_dropout_prob)(h, deterministic=self.deterministic)
        return layers.layer_norm(cfg.layer_norm_eps, param_dtype=self.param_dtype,
                                 name="LayerNorm")(h.astype(jnp.float32) + residual.astype(jnp.float32))


class QFormerMultiHeadAttention(nn.Module):
    """query/key/value projections + attention. Cross-attention takes keys from the image."""

    config: QFormerConfig
    is_cross_attention: bool = False
    deterministic: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, kv_input: jax.Array, mask: jax.Array | None,
                 prefix: KV | None = None, kv_rows: jax.Array | None = None) -> tuple[jax.Array, KV]:
        """x (B,T,D), kv_input (B,S,Dk) -> (B,T,D) and this call's own (K, V) (B,S,N,H).
        With `kv_rows` (B,) the keys/values are projected from kv_input's rows (M,S,Dk) once each
        and row b reads row kv_rows[b]: ITM's 3N pairs show each of N images up to 3 times."""
        cfg = self.config
        n = cfg.num_attention_heads
        h = cfg.hidden_size // n
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        split = lambda y: y.reshape(*y.shape[:2], n, h)  # noqa: E731
        q = split(layers.dense(cfg.hidden_size, ("embed", "heads"), name="query", **kw)(x))
        k = split(layers.dense(cfg.hidden_size, ("embed", "heads"), name="key", **kw)(kv_input))
        v = split(layers.dense(cfg.hidden_size, ("embed", "heads"), name="value", **kw)(kv_input))
        if kv_rows is not None:
            k, v = k[kv_rows], v[kv_rows]
        keys, values = (k, v) if prefix is None else (jnp.concatenate([prefix[0], k], 1),
                                                      jnp.concatenate([prefix[1], v], 1))
        rate = cfg.attention_probs_dropout_prob
        rng = None if self.deterministic or rate == 0 else self.make_rng("dropout")
        out = dot_product_attention(q, keys, values, mask=mask, dropout_rate=rate, dropout_rng=rng,
                                    deterministic=self.deterministic)
        return out.reshape(*x.shape[:2], cfg.hidden_size), (k, v)


class QFormerAttention(nn.Module):
    config: QFormerConfig
    is_cross_attention: bool = False
    deterministic: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, kv_input: jax.Array, mask: jax.Array | None,
                 prefix: KV | None = None, kv_rows: jax.Array | None = None) -> tuple[jax.Array, KV]:
        kw = dict(deterministic=self.deterministic, dtype=self.dtype, param_dtype=self.param_dtype)
        out, kv = QFormerMultiHeadAttention(self.config, self.is_cross_attention, name="attention", **kw)(
            x, kv_input, mask, prefix, kv_rows)
        return ResidualOutput(self.config, name="output", **kw)(out, x), kv


class Intermediate(nn.Module):
    """BERT's `intermediate(_query)`: act(dense(x))."""

    config: QFormerConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = layers.dense(self.config.intermediate_size, ("embed", "mlp"), name="dense", dtype=self.dtype,
                         param_dtype=self.param_dtype)(x)
        return layers.activation(self.config.hidden_act)(h)


class QFormerLayer(nn.Module):
    """One post-LN layer. Rows [0, query_length) are queries, the rest text (spec §3.4)."""

    config: QFormerConfig
    has_cross_attention: bool
    query_length: int
    deterministic: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _feed_forward(self, x: jax.Array, suffix: str) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = Intermediate(self.config, name=f"intermediate{suffix}", **kw)(x)
        return ResidualOutput(self.config, self.deterministic, "mlp", name=f"output{suffix}", **kw)(h, x)

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, image: jax.Array | None,
                 prefix: KV | None, image_rows: jax.Array | None) -> tuple[jax.Array, KV]:
        kw = dict(deterministic=self.deterministic, dtype=self.dtype, param_dtype=self.param_dtype)
        attn, kv = QFormerAttention(self.config, name="attention", **kw)(x, x, mask, prefix)
        q_len = self.query_length
        rows = []
        if q_len > 0:
            queries = attn[:, :q_len]
            if self.has_cross_attention:
                if image is None:
                    raise ValueError("the Q-Former's query rows need image embeddings for cross-attention")
                cross = QFormerAttention(self.config, True, name="crossattention", **kw)
                queries, _ = cross(queries, image, None, kv_rows=image_rows)
            rows.append(self._feed_forward(queries, "_query"))
        if attn.shape[1] > q_len:
            if not self.config.use_qformer_text_input:
                raise ValueError("text rows need the text feed-forward: this Q-Former config has "
                                 "use_qformer_text_input=False (a generation checkpoint)")
            rows.append(self._feed_forward(attn[:, q_len:], ""))
        out = rows[0] if len(rows) == 1 else jnp.concatenate(rows, axis=1)
        return nn.with_logical_constraint(out, ("batch", "length", "embed")), kv


class QFormerLayerGroup(nn.Module):
    """`size` consecutive layers starting at a multiple of `cross_attention_frequency`, so the
    first has cross-attention."""

    config: QFormerConfig
    size: int
    query_length: int
    deterministic: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, image: jax.Array | None,
                 prefix: KV | None, image_rows: jax.Array | None) -> tuple[jax.Array, KV]:
        kvs = []
        for j in range(self.size):
            layer_prefix = None if prefix is None else (prefix[0][j], prefix[1][j])
            x, kv = QFormerLayer(self.config, j == 0, self.query_length, self.deterministic, self.dtype,
                                 self.param_dtype, name=f"layer_{j}")(x, mask, image, layer_prefix, image_rows)
            kvs.append(kv)
        return x, (jnp.stack([k for k, _ in kvs]), jnp.stack([v for _, v in kvs]))


class QFormerEncoder(nn.Module):
    """The full groups scanned, then the shorter last group (if the depth leaves one)."""

    config: QFormerConfig
    query_length: int
    deterministic: bool = True
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, image: jax.Array | None,
                 prefix: KV | None, image_rows: jax.Array | None) -> tuple[jax.Array, KV]:
        """prefix and the returned (K, V) are per layer: (layers, B, S, N, H)."""
        cfg = self.config
        groups, rest = cfg.layer_groups
        f = cfg.cross_attention_frequency
        kw = dict(config=cfg, query_length=self.query_length, deterministic=self.deterministic, dtype=self.dtype,
                  param_dtype=self.param_dtype)
        kvs = []
        if groups:
            stack = layers.stack_layers(QFormerLayerGroup, length=groups, remat_policy=self.remat_policy,
                                        in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast))
            head = None if prefix is None else tuple(p[:groups * f].reshape(groups, f, *p.shape[1:]) for p in prefix)
            x, kv = stack(size=f, name="layers", **kw)(x, mask, image, head, image_rows)
            kvs.append(tuple(t.reshape(-1, *t.shape[2:]) for t in kv))
        if rest:
            tail = None if prefix is None else tuple(p[groups * f:] for p in prefix)
            group = layers.remat(QFormerLayerGroup, remat_policy=self.remat_policy)
            x, kv = group(size=rest, name="remainder", **kw)(x, mask, image, tail, image_rows)
            kvs.append(kv)
        k, v = (jnp.concatenate(parts) for parts in zip(*kvs))
        return x, (k, v)


class QFormer(nn.Module):
    """HF `Blip2QFormerModel`: LayerNorm + dropout on the input rows, then the layers."""

    config: QFormerConfig
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, embeds: jax.Array, *, query_length: int, attention_mask: jax.Array | None = None,
                 image_embeds: jax.Array | None = None, image_rows: jax.Array | None = None,
                 prefix: KV | None = None, deterministic: bool = True) -> tuple[jax.Array, KV]:
        """Run the Q-Former.

        embeds: (B,T,D) rows [queries (query_length) ; text embeddings], before `layernorm`.
        attention_mask: (B,T) key padding (1 = real) or a boolean mask broadcastable to
          (B,1,T,P+T) (P = prefix length), e.g. from `attention.qformer_mask`.
        image_embeds: (B,S,Dv) keys/values of cross-attention (needed when query_length > 0), or
          (M,S,Dv) with `image_rows` (B,): row b attends to image image_rows[b], and each image's
          keys/values are projected once.
        prefix: per-layer self-attention (K, V), each (layers, B, P, N, H), attended before the rows.
        Returns the output rows (B,T,D) and every layer's self-attention (K, V) (layers, B, T, N, H).
        """
        cfg = self.config
        x = layers.layer_norm(cfg.layer_norm_eps, param_dtype=self.param_dtype, name="layernorm")(embeds)
        x = nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)
        mask = padding_mask(attention_mask) if attention_mask is not None and attention_mask.ndim == 2 \
            else attention_mask
        if image_embeds is not None:
            image_embeds = image_embeds.astype(self.dtype)
        return QFormerEncoder(cfg, query_length, deterministic, self.remat_policy, self.dtype,
                              self.param_dtype, name="encoder")(x, mask, image_embeds, prefix, image_rows)


class InstructionEmbeddings(QFormerTextEmbeddings):
    """HF `InstructBlipQFormerEmbeddings`: the instruction's word + position embeddings (positions
    from 0), after the queries, and one LayerNorm over both, held here (`embeddings/layernorm`)."""

    def setup(self):
        super().setup()
        self.layernorm = layers.layer_norm(self.config.layer_norm_eps, param_dtype=self.param_dtype, name="layernorm")

    def rows(self, queries: jax.Array, input_ids: jax.Array) -> jax.Array:
        """LayerNorm([queries (B,Q,D) ; embed(input_ids) (B,L,D)]) in float32."""
        return self.layernorm(jnp.concatenate([queries.astype(jnp.float32), self(input_ids)], axis=1))


class InstructionQFormer(nn.Module):
    """HF `InstructBlipQFormerModel`: the queries and the instruction in one pass, both ways visible
    (padding masked), cross-attention for the query rows only: the query rows come back."""

    config: QFormerConfig
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, queries: jax.Array, input_ids: jax.Array, attention_mask: jax.Array, image_embeds: jax.Array,
                 *, deterministic: bool = True) -> jax.Array:
        """queries (B,Q,D), the instruction's input_ids/attention_mask (B,L), image_embeds (B,S,Dv)
        -> the query rows (B,Q,D)."""
        cfg, q = self.config, queries.shape[1]
        embeddings = InstructionEmbeddings(cfg, self.dtype, self.param_dtype, name="embeddings")
        x = nn.Dropout(cfg.hidden_dropout_prob)(embeddings.rows(queries, input_ids), deterministic=deterministic)
        mask = padding_mask(jnp.concatenate([jnp.ones(queries.shape[:2], attention_mask.dtype), attention_mask], 1))
        out, _ = QFormerEncoder(cfg, q, deterministic, self.remat_policy, self.dtype, self.param_dtype,
                                name="encoder")(x, mask, image_embeds.astype(self.dtype), None, None)
        return out[:, :q]
