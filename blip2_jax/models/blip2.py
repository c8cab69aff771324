"""The BLIP-2 composites: image -> frozen ViT -> Q-Former -> (LLM | retrieval heads).

`Blip2ForConditionalGeneration` and `Blip2ForImageTextRetrieval` compute what their Hugging Face
namesakes compute, with the same parameter tree (design decision 2). Named methods
(`encode_image`, `query_features`, `language_inputs`, `image_features`, `text_features`, `itm`)
are the building blocks the objectives, generation and evaluation call.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

from blip2_jax.errors import UnknownName
from blip2_jax.models import layers, lora, quantization
from blip2_jax.models.attention import qformer_mask
from blip2_jax.models.config import Blip2Config, LlamaConfig, OPTConfig, T5Config
from blip2_jax.models.llama import LlamaForCausalLM
from blip2_jax.models.opt import OPTForCausalLM
from blip2_jax.models.qformer import KV, InstructionQFormer, QFormer, QFormerTextEmbeddings
from blip2_jax.models.t5 import T5ForConditionalGeneration
from blip2_jax.models.vit import VisionModel


@struct.dataclass
class Blip2Output:
    logits: jax.Array  # (B, T, V) float32
    image_embeds: jax.Array  # post_layernorm(ViT) (B, N, Dv)
    query_output: jax.Array  # Q-Former query rows (B, Q, Dq)
    language_inputs: jax.Array  # language_projection(query_output) (B, Q, D_llm)


@struct.dataclass
class RetrievalOutput:
    logits_per_image: jax.Array  # ITM: (B, 2) logits; ITC: (B_img, B_txt) max-over-queries cosine
    image_embeds: jax.Array | None  # ITC: normalised projected queries (B_img, Q, E)
    text_embeds: jax.Array | None  # ITC: normalised projected [CLS] (B_txt, E)


class Blip2Base(nn.Module):
    """Vision tower, learned queries and Q-Former: what every BLIP-2 model shares."""

    config: Blip2Config

    def setup(self):
        cfg = self.config
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
        self.vision_model = VisionModel(cfg.vision, cfg.remat_policy, **kw)
        self.query_tokens = self.param(
            "query_tokens", layers.partitioned(layers.default_init, (None, None, "embed")),
            (1, cfg.num_query_tokens, cfg.qformer.hidden_size), cfg.weight_dtype)
        self.qformer = (InstructionQFormer if cfg.instruction_aware else QFormer)(cfg.qformer, cfg.remat_policy, **kw)

    def encode_image(self, pixel_values: jax.Array, *, interpolate_pos_encoding: bool = False,
                     deterministic: bool = True) -> jax.Array:
        """(B,H,W,3) -> image embeddings `ln_vision(ViT(x))` (B, N, Dv)."""
        return self.vision_model(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                                 deterministic=deterministic)

    def query_pass(self, image_embeds: jax.Array, *, deterministic: bool = True) -> tuple[jax.Array, KV]:
        """Query-only Q-Former pass: Z (B, Q, Dq) and every layer's self-attention (K, V) of the
        queries (layers, B, Q, N, H), the prefix that ITG and Q-Former captioning attend to."""
        queries = jnp.broadcast_to(self.query_tokens, (image_embeds.shape[0], *self.query_tokens.shape[1:]))
        return self.qformer(queries, query_length=queries.shape[1], image_embeds=image_embeds,
                            deterministic=deterministic)

    def query_features(self, image_embeds: jax.Array, *, deterministic: bool = True) -> jax.Array:
        """Query-only Q-Former pass over the image: (B, N, Dv) -> Z (B, Q, Dq)."""
        return self.query_pass(image_embeds, deterministic=deterministic)[0]


def merge_image_tokens(inputs_embeds: jax.Array, input_ids: jax.Array, image_token_index: int,
                       image_inputs: jax.Array) -> jax.Array:
    """Overwrite the positions holding `image_token_index` by `image_inputs`, in order (HF's
    `masked_scatter` with exactly Q image tokens per row). inputs_embeds (B,T,D), image_inputs (B,Q,D)."""
    is_image = input_ids == image_token_index
    slot = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, image_inputs.shape[1] - 1)
    gathered = jnp.take_along_axis(image_inputs, slot[..., None], axis=1)
    return jnp.where(is_image[..., None], gathered.astype(inputs_embeds.dtype), inputs_embeds)


class Blip2ForConditionalGeneration(Blip2Base):
    """BLIP-2 with a frozen OPT (decoder-only) or T5 (encoder-decoder) language model.

    `scan_lm_layers=False` is the decoding layout: the LLM's decoder layers are separate
    parameters (`unscan_language_model` turns the scanned tree into it), so a decoding step reads
    the weights in place instead of slicing each layer out of the stack.
    """

    scan_lm_layers: bool = True

    def setup(self):
        super().setup()
        cfg = self.config
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
        self.language_projection = layers.dense(cfg.text.hidden_size, ("embed", "mlp"), name="language_projection",
                                                **kw)
        if type(cfg.text) not in LANGUAGE_MODELS:
            raise ValueError(f"Blip2ForConditionalGeneration needs an OPT, LLaMA or T5 text config, got {cfg.text!r}")
        self.language_model = LANGUAGE_MODELS[type(cfg.text)](cfg.text, remat_policy=cfg.remat_policy, **kw,
                                                              scan_layers=self.scan_lm_layers)

    def language_inputs(self, query_output: jax.Array) -> jax.Array:
        """Q-Former output (B,Q,Dq) -> soft visual prompt for the LLM (B,Q,D_llm)."""
        return self.language_projection(query_output)

    def embed_prompt(self, input_ids: jax.Array, attention_mask: jax.Array,
                     image_inputs: jax.Array) -> tuple[jax.Array, jax.Array]:
        """LLM input embeddings with the visual prompt placed as HF does (spec §11.4).

        With `image_token_index` set, input_ids already hold Q `<image>` tokens whose embeddings
        are replaced; without it (legacy checkpoints) the visual prompt is prepended.
        """
        embeds = self.language_model.embed(input_ids)
        index = self.config.image_token_index
        if index is not None:
            return merge_image_tokens(embeds, input_ids, index, image_inputs), attention_mask
        ones = jnp.ones(image_inputs.shape[:2], attention_mask.dtype)
        return (jnp.concatenate([image_inputs.astype(embeds.dtype), embeds], axis=1),
                jnp.concatenate([ones, attention_mask], axis=1))

    def __call__(self, pixel_values: jax.Array, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 decoder_input_ids: jax.Array | None = None, decoder_attention_mask: jax.Array | None = None,
                 *, interpolate_pos_encoding: bool = False, deterministic: bool = True) -> Blip2Output:
        """Logits of the LLM conditioned on the image (OPT: over the whole input; T5: decoder)."""
        image_embeds = self.encode_image(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                                         deterministic=deterministic)
        query_output = self.query_features(image_embeds, deterministic=deterministic)
        return self.language_logits(image_embeds, query_output, input_ids, attention_mask, decoder_input_ids,
                                    decoder_attention_mask, deterministic=deterministic)

    def language_logits(self, image_embeds: jax.Array, query_output: jax.Array, input_ids: jax.Array,
                        attention_mask: jax.Array | None, decoder_input_ids: jax.Array | None,
                        decoder_attention_mask: jax.Array | None, *, deterministic: bool) -> Blip2Output:
        """The LLM's logits over the prompt holding the projected queries (`__call__`'s second half)."""
        image_inputs = self.language_inputs(query_output)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        embeds, mask = self.embed_prompt(input_ids, attention_mask, image_inputs)
        if not self.config.text.is_encoder_decoder:
            logits, _ = self.language_model(embeds, mask, deterministic=deterministic)
        else:
            if decoder_input_ids is None:
                raise ValueError("a T5 BLIP-2 needs decoder_input_ids")
            logits = self.language_model(embeds, mask, decoder_input_ids, decoder_attention_mask,
                                         deterministic=deterministic)
        return Blip2Output(logits=logits, image_embeds=image_embeds, query_output=query_output,
                           language_inputs=image_inputs)


class InstructBlipForConditionalGeneration(Blip2ForConditionalGeneration):
    """InstructBLIP (Dai et al. 2023; HF `InstructBlipForConditionalGeneration`): BLIP-2 whose
    Q-Former reads the instruction's tokens (`qformer_input_ids`, its own BERT vocabulary) beside
    the queries; only the query rows go to the projection and the LLM, whose prompt holds the
    instruction too."""

    def instruction_features(self, image_embeds: jax.Array, qformer_input_ids: jax.Array,
                             qformer_attention_mask: jax.Array, *, deterministic: bool = True) -> jax.Array:
        """(B, N, Dv) image embeddings and the instruction (B, L) -> query rows Z (B, Q, Dq)."""
        queries = jnp.broadcast_to(self.query_tokens, (image_embeds.shape[0], *self.query_tokens.shape[1:]))
        return self.qformer(queries, qformer_input_ids, qformer_attention_mask, image_embeds,
                            deterministic=deterministic)

    def query_features(self, image_embeds: jax.Array, *, deterministic: bool = True) -> jax.Array:
        raise TypeError("InstructBLIP's queries read an instruction: call instruction_features")

    def __call__(self, pixel_values: jax.Array, qformer_input_ids: jax.Array, qformer_attention_mask: jax.Array,
                 input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 decoder_input_ids: jax.Array | None = None, decoder_attention_mask: jax.Array | None = None,
                 *, interpolate_pos_encoding: bool = False, deterministic: bool = True) -> Blip2Output:
        """Logits of the LLM conditioned on the image and the instruction (as the parent's)."""
        image_embeds = self.encode_image(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                                         deterministic=deterministic)
        query_output = self.instruction_features(image_embeds, qformer_input_ids, qformer_attention_mask,
                                                 deterministic=deterministic)
        return self.language_logits(image_embeds, query_output, input_ids, attention_mask, decoder_input_ids,
                                    decoder_attention_mask, deterministic=deterministic)


# The LLM class of each text config; decoder-only ones share OPT's interface (embed, init_cache, a
# call with a cache and a shared prefix), encoder-decoder T5 its own (encode, cross_memory, decode).
LANGUAGE_MODELS: dict[type, type[nn.Module]] = {OPTConfig: OPTForCausalLM, LlamaConfig: LlamaForCausalLM,
                                                T5Config: T5ForConditionalGeneration}


def unscan_language_model(config: Blip2Config, params: dict[str, Any]) -> dict[str, Any]:
    """Parameters of `Blip2ForConditionalGeneration(config)` in the layout of the same model with
    `scan_lm_layers=False`: the LLM decoder's stacked layers split into one tree per layer, their
    Dense kernels stored (out, in) (`layers.transpose_kernels`), the layout a decoding step's
    few-row matmuls read fastest (parameters already in that layout come back as they are)."""
    *parents, leaf = LANGUAGE_MODELS[type(config.text)].DECODER_LAYERS
    out = dict(params)
    node = out["language_model"] = dict(out["language_model"])
    for key in parents:
        node[key] = dict(node[key])
        node = node[key]
    if "0" not in node[leaf]:
        node[leaf] = layers.unstack_layers(node[leaf])
    node[leaf] = layers.transpose_kernels(node[leaf])
    return out


def _normalize(x: jax.Array) -> jax.Array:
    """x / max(||x||, 1e-12), as torch.nn.functional.normalize."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class Blip2ForImageTextRetrieval(Blip2Base):
    """BLIP-2 with text input to the Q-Former: ITC projections and the ITM head."""

    def setup(self):
        super().setup()
        cfg = self.config
        if not cfg.qformer.use_qformer_text_input:
            raise ValueError("Blip2ForImageTextRetrieval needs qformer.use_qformer_text_input=True")
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
        self.embeddings = QFormerTextEmbeddings(cfg.qformer, **kw)
        self.vision_projection = layers.dense(cfg.image_text_hidden_size, ("embed", "mlp"), name="vision_projection",
                                              **kw)
        self.text_projection = layers.dense(cfg.image_text_hidden_size, ("embed", "mlp"), name="text_projection",
                                            **kw)
        self.itm_head = layers.dense(2, ("embed", None), name="itm_head", **kw)

    def image_features(self, image_embeds: jax.Array, *, deterministic: bool = True) -> jax.Array:
        """Normalised projected queries (B, Q, E) for ITC."""
        return self.project_queries(self.query_features(image_embeds, deterministic=deterministic))

    def project_queries(self, query_output: jax.Array) -> jax.Array:
        """Q-Former query rows (B, Q, Dq) -> normalised ITC image features (B, Q, E)."""
        return _normalize(self.vision_projection(query_output))

    def text_hidden(self, input_ids: jax.Array, attention_mask: jax.Array, *,
                    deterministic: bool = True) -> jax.Array:
        """The text-only Q-Former pass (bidirectional over real tokens, text FFN): (B, L, Dq)."""
        out, _ = self.qformer(self.embeddings(input_ids), query_length=0, attention_mask=attention_mask,
                              deterministic=deterministic)
        return out

    def text_features(self, input_ids: jax.Array, attention_mask: jax.Array, *,
                      deterministic: bool = True) -> jax.Array:
        """Normalised projected [CLS] of the text-only pass (B, E)."""
        out = self.text_hidden(input_ids, attention_mask, deterministic=deterministic)
        return _normalize(self.text_projection(out[:, 0]))

    def text_token_features(self, input_ids: jax.Array, attention_mask: jax.Array, *,
                            deterministic: bool = True) -> jax.Array:
        """Every token of the text-only pass, projected and normalised (B, L, E), as transformers'
        `Blip2TextModelWithProjection` returns them; ITC reads the [CLS] row."""
        return _normalize(self.text_projection(self.text_hidden(input_ids, attention_mask,
                                                                deterministic=deterministic)))

    def multimodal_features(self, image_embeds: jax.Array, input_ids: jax.Array, attention_mask: jax.Array, *,
                            image_rows: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        """The query rows (B, Q, Dq) of a joint bidirectional pass over the queries and the text
        (LAVIS's multimodal features). With `image_rows` (B,), pair b is image image_rows[b] of
        image_embeds (M, S, Dv) with text b."""
        b, q = input_ids.shape[0], self.config.num_query_tokens
        queries = jnp.broadcast_to(self.query_tokens, (b, *self.query_tokens.shape[1:]))
        rows = jnp.concatenate([queries.astype(jnp.float32), self.embeddings(input_ids)], axis=1)
        out, _ = self.qformer(rows, query_length=q, attention_mask=qformer_mask("bidirectional", q, attention_mask),
                              image_embeds=image_embeds, image_rows=image_rows, deterministic=deterministic)
        return out[:, :q]

    def itm(self, image_embeds: jax.Array, input_ids: jax.Array, attention_mask: jax.Array, *,
            image_rows: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        """ITM logits (B, 2): mean over the multimodal query rows of `itm_head`."""
        rows = self.multimodal_features(image_embeds, input_ids, attention_mask, image_rows=image_rows,
                                        deterministic=deterministic)
        return jnp.mean(self.itm_head(rows).astype(jnp.float32), axis=1)

    def __call__(self, pixel_values: jax.Array, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 *, use_image_text_matching_head: bool = False, interpolate_pos_encoding: bool = False,
                 deterministic: bool = True) -> RetrievalOutput:
        """HF semantics: ITM logits (B,2) for aligned pairs, or ITC cosine (B_img, B_txt)."""
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        image_embeds = self.encode_image(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                                         deterministic=deterministic)
        if use_image_text_matching_head:
            return RetrievalOutput(self.itm(image_embeds, input_ids, attention_mask, deterministic=deterministic),
                                   None, None)
        image_feats = self.image_features(image_embeds, deterministic=deterministic)
        text_feats = self.text_features(input_ids, attention_mask, deterministic=deterministic)
        sims = jnp.max(jnp.einsum("iqe,te->iqt", image_feats, text_feats), axis=1)
        return RetrievalOutput(sims, image_feats, text_feats)

    def init_all(self, pixel_values: jax.Array, input_ids: jax.Array) -> RetrievalOutput:
        """Touches every parameter (ITC and ITM paths) so `init` creates them all."""
        self(pixel_values, input_ids, use_image_text_matching_head=True)
        return self(pixel_values, input_ids)


class LMTransform(nn.Module):
    """BERT's `cls.predictions.transform`: LayerNorm(act(dense(x)))."""

    hidden_size: int
    hidden_act: str
    layer_norm_eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = layers.dense(self.hidden_size, ("embed", "mlp"), name="dense", dtype=self.dtype,
                         param_dtype=self.param_dtype)(x)
        h = layers.activation(self.hidden_act)(h)
        return layers.layer_norm(self.layer_norm_eps, param_dtype=self.param_dtype, name="LayerNorm")(h)


class LMPredictions(nn.Module):
    """BERT's `cls.predictions`: transform, then the decoder tied to the word embeddings + bias."""

    config: Any  # QFormerConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, embeddings: QFormerTextEmbeddings) -> jax.Array:
        cfg = self.config
        h = LMTransform(cfg.hidden_size, cfg.hidden_act, cfg.layer_norm_eps, self.dtype, self.param_dtype,
                        name="transform")(hidden)
        bias = self.param("bias", layers.partitioned(nn.initializers.zeros_init(), ("vocab",)), (cfg.vocab_size,),
                          self.param_dtype)
        return embeddings.attend(h.astype(self.dtype)).astype(jnp.float32) + bias


class BertLMHead(nn.Module):
    """Holds `predictions` so paths read `cls/predictions/...` as in LAVIS/BERT."""

    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, embeddings: QFormerTextEmbeddings) -> jax.Array:
        return LMPredictions(self.config, self.dtype, self.param_dtype, name="predictions")(hidden, embeddings)


class Blip2Stage1(Blip2ForImageTextRetrieval):
    """The stage-1 model (LAVIS `Blip2Qformer`): the retrieval model plus the Q-Former's LM head
    (ITG) and the learnable ITC temperature `temp` (init 0.07, spec §3.5). Neither has a home in
    Hugging Face's classes; conversion keeps them in a side file."""

    temp_init: float = 0.07

    def setup(self):
        super().setup()
        cfg = self.config
        self.cls = BertLMHead(cfg.qformer, cfg.compute_dtype, cfg.weight_dtype)
        self.temp = self.param("temp", layers.partitioned(nn.initializers.constant(self.temp_init), ()), (),
                               jnp.float32)

    def lm_logits(self, hidden: jax.Array) -> jax.Array:
        """The Q-Former LM head on text rows (B, L, Dq) -> (B, L, V)."""
        return self.cls(hidden, self.embeddings)

    def itg_logits(self, input_ids: jax.Array, attention_mask: jax.Array, query_kv: KV, *,
                   deterministic: bool = True) -> jax.Array:
        """Image-grounded text generation logits (B, L, V): the text attends causally to itself
        and to the query-only pass's self-attention keys/values (`query_kv`, from `query_pass`),
        which is a joint [queries ; text] pass under the multimodal-causal mask without
        recomputing the queries (spec §5.3)."""
        q = query_kv[0].shape[2]
        mask = qformer_mask("multimodal_causal", q, attention_mask)[:, :, q:, :]
        out, _ = self.qformer(self.embeddings(input_ids), query_length=0, attention_mask=mask, prefix=query_kv,
                              deterministic=deterministic)
        return self.cls(out, self.embeddings)

    def joint_logits(self, image_embeds: jax.Array, input_ids: jax.Array, attention_mask: jax.Array,
                     kind: str, *, deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
        """One pass over [queries ; text] under the `kind` mask: (query rows, LM logits of text rows)."""
        b, q = input_ids.shape[0], self.config.num_query_tokens
        queries = jnp.broadcast_to(self.query_tokens, (b, *self.query_tokens.shape[1:]))
        rows = jnp.concatenate([queries.astype(jnp.float32), self.embeddings(input_ids)], axis=1)
        out, _ = self.qformer(rows, query_length=q, attention_mask=qformer_mask(kind, q, attention_mask),
                              image_embeds=image_embeds, deterministic=deterministic)
        return out[:, :q], self.cls(out[:, q:], self.embeddings)

    def init_all(self, pixel_values: jax.Array, input_ids: jax.Array) -> RetrievalOutput:
        image_embeds = self.encode_image(pixel_values)
        _, kv = self.query_pass(image_embeds)
        self.itg_logits(input_ids, jnp.ones_like(input_ids), kv)
        return super().init_all(pixel_values, input_ids)


Model = Blip2ForConditionalGeneration | Blip2ForImageTextRetrieval

# The architecture registry: the one place that says which class a name, a training stage or a
# checkpoint is. The names are what model checkpoints store (the three Hugging Face classes and
# LAVIS's stage-1 model, which adds the Q-Former's LM head and `temp`).
ARCHITECTURES: dict[str, type[Model]] = {
    cls.__name__: cls for cls in (Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, Blip2Stage1,
                                  InstructBlipForConditionalGeneration)}
STAGES = {"stage1": "Blip2Stage1", "stage2": "Blip2ForConditionalGeneration", "lm": "Blip2ForConditionalGeneration"}


def architecture_of(config: Blip2Config, *, itg_head: bool = False) -> str:
    """The architecture of weights for `config`: the generation model when it has an LLM, else the
    retrieval model, or stage 1 when the weights also hold the Q-Former's LM head (`itg_head`)."""
    if config.instruction_aware:
        return "InstructBlipForConditionalGeneration"
    if config.text is not None:
        return "Blip2ForConditionalGeneration"
    return "Blip2Stage1" if itg_head else "Blip2ForImageTextRetrieval"


def stage_architecture(stage: str, config: Blip2Config) -> str:
    """The architecture a training `stage` trains for `config`: stage 2 of an instruction-aware
    config is InstructBLIP's instruction tuning (its Q-Former reads the instruction)."""
    if stage == "stage2" and config.instruction_aware:
        return architecture_of(config)
    return STAGES[stage]


def build(config: Blip2Config, architecture: str | None = None) -> Model:
    """The composite named `architecture` (default: `architecture_of(config)`)."""
    name = architecture or architecture_of(config)
    if name not in ARCHITECTURES:
        raise UnknownName(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name](config)


def _dummy_inputs(config: Blip2Config) -> dict[str, jax.Array]:
    size = config.vision.image_size
    batch = {"pixel_values": jnp.zeros((1, size, size, 3), jnp.float32), "input_ids": jnp.ones((1, 2), jnp.int32)}
    if isinstance(config.text, T5Config):
        batch["decoder_input_ids"] = jnp.zeros((1, 2), jnp.int32)
    if config.instruction_aware:
        batch.update(qformer_input_ids=jnp.ones((1, 2), jnp.int32), qformer_attention_mask=jnp.ones((1, 2), jnp.int32))
    if config.image_token_index is not None and config.text is not None:
        batch["input_ids"] = jnp.concatenate(
            [jnp.full((1, config.num_query_tokens), config.image_token_index, jnp.int32), batch["input_ids"]], 1)
    return batch


def init(config: Blip2Config, rng: jax.Array, model: nn.Module | None = None) -> Any:
    """Freshly initialised variables (boxed with logical axis names) for `config` (and `model`,
    default `build(config)`)."""
    model = build(config) if model is None else model
    method = model.init_all if isinstance(model, Blip2ForImageTextRetrieval) else model.__call__
    variables = model.init(rng, **_dummy_inputs(config), method=method)
    params = lora.add(variables["params"], config.lora, jax.random.fold_in(rng, 1))  # adapters on float kernels
    return {**variables, "params": quantization.quantize(params, config.int8)}


def abstract_params(config: Blip2Config, *, unbox: bool = True, model: nn.Module | None = None) -> Any:
    """Shapes/dtypes of the parameters without allocating them (`jax.eval_shape`)."""
    variables = jax.eval_shape(lambda: init(config, jax.random.PRNGKey(0), model))
    return nn.unbox(variables["params"]) if unbox else variables["params"]
