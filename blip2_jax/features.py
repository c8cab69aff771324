"""Feature extraction: the outputs LAVIS's `extract_features` and transformers' feature methods
give, from any BLIP-2 checkpoint `weights.load` reads, as pure functions to jit and as an
extractor over images and texts in batches.

- `image_embeds` (B, N, Dv): the ViT's output after `ln_vision`; transformers' `Blip2VisionModel`
  `last_hidden_state` (= `Blip2Model.get_image_features`).
- `query_output` (B, Q, Dq): the Q-Former's query rows over the image; `Blip2Model.get_qformer_features`,
  LAVIS's `image_embeds`.
- `language_inputs` (B, Q, D_llm): those rows projected for the LLM (stage-2 models);
  `Blip2ForConditionalGeneration.get_image_features().pooler_output`.
- `itc_image` (B, Q, E): those rows projected for ITC and normalised (retrieval models);
  `Blip2VisionModelWithProjection` `image_embeds`, LAVIS's `image_embeds_proj`.
- `itc_text` (B, L, E): every token of the text-only pass projected and normalised, ITC reads
  [CLS]; `Blip2TextModelWithProjection` `text_embeds`, LAVIS's `text_embeds_proj`.
- `multimodal` (B, Q, Dq): the query rows of the joint image-text pass (ITM's input); LAVIS's
  `multimodal_embeds`.

An ITC score is max over the Q image rows of `itc_image @ itc_text[:, 0]`, as the retrieval
evaluator computes it.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np

from blip2_jax.data.images import ImageInput, preprocess_images
from blip2_jax.data.tokenizers import qformer_tokenizer
from blip2_jax.errors import UserError
from blip2_jax.models import blip2

IMAGE_FEATURES = ("image_embeds", "query_output", "language_inputs", "itc_image")
TEXT_BUCKET = 8  # texts are padded to a multiple of this: few compiles over a data set


def image_features(params: Any, pixel_values: jax.Array, *, model: Any, name: str) -> jax.Array:
    """One of IMAGE_FEATURES for a batch of images (B, H, W, 3), preprocessed; a pure function."""
    def run(module):
        image_embeds = module.encode_image(pixel_values)
        if name == "image_embeds":
            return image_embeds
        query_output = module.query_features(image_embeds)
        if name == "query_output":
            return query_output
        return module.language_inputs(query_output) if name == "language_inputs" else \
            module.project_queries(query_output)

    check_feature(model, name)
    return _apply(model, params, run)


def text_features(params: Any, input_ids: jax.Array, attention_mask: jax.Array, *, model: Any) -> jax.Array:
    """`itc_text` (B, L, E) for Q-Former token ids and their mask (retrieval models)."""
    check_feature(model, "itc_text")
    return _apply(model, params, lambda m: m.text_token_features(input_ids, attention_mask))


def multimodal_features(params: Any, pixel_values: jax.Array, input_ids: jax.Array, attention_mask: jax.Array, *,
                        model: Any) -> jax.Array:
    """`multimodal` (B, Q, Dq): image b with text b (retrieval models)."""
    check_feature(model, "multimodal")
    return _apply(model, params, lambda m: m.multimodal_features(m.encode_image(pixel_values), input_ids,
                                                                   attention_mask))


def _apply(model: Any, params: Any, fn: Callable[[Any], jax.Array]) -> jax.Array:
    """`fn(bound module)` with `params`, the module's methods called inside one `apply`."""
    return model.apply({"params": params}, fn, method=lambda module, f: f(module))


def check_feature(model: Any, name: str) -> None:
    """A UserError unless `model` computes the feature `name`."""
    retrieval = isinstance(model, blip2.Blip2ForImageTextRetrieval)
    needs = {"language_inputs": isinstance(model, blip2.Blip2ForConditionalGeneration),
             "itc_image": retrieval, "itc_text": retrieval, "multimodal": retrieval}
    if name not in (*IMAGE_FEATURES, "itc_text", "multimodal"):
        raise UserError(f"unknown feature {name!r}; known: {', '.join(IMAGE_FEATURES)}, itc_text, multimodal")
    if not needs.get(name, True):
        holder = "a stage-2 model (with an LLM)" if name == "language_inputs" else \
            "a retrieval model (Blip2ForImageTextRetrieval or a stage-1 checkpoint)"
        raise UserError(f"{name} needs {holder}; this is a {type(model).__name__}")
    if isinstance(model, blip2.InstructBlipForConditionalGeneration) and name != "image_embeds":
        raise UserError(f"{name}: an InstructBLIP's queries read an instruction; use its generation API")


@functools.lru_cache(maxsize=16)
def _jitted(model: Any, fn: Callable, kw: tuple) -> Callable:
    """One jitted feature function per (model, function, options): another extractor of the same
    model (e.g. the next `blip2-jax infer embed` job in this process) reuses its compiles."""
    return jax.jit(functools.partial(fn, model=model, **dict(kw)))


class FeatureExtractor:
    """A checkpoint's features over lists of images and texts, `batch_size` at a time, each kind
    of feature compiled once per batch shape (host arrays out)."""

    def __init__(self, model: Any, params: Any, *, tokenizer: Any = None, batch_size: int = 16):
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.params, self.tokenizer, self.batch_size = model, params, tokenizer, batch_size
        self._compiled: dict[str, Callable] = {}

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, *, step: int | None = None, tokenizer: str = "",
                        batch_size: int = 16, dtype: Any = None) -> FeatureExtractor:
        """Anything `weights.load` reads; `tokenizer` (the Q-Former's BERT tokenizer, for text and
        multimodal features) defaults to the checkpoint's own where it is a BERT one."""
        from blip2_jax.weights.load import load  # pylint: disable=import-outside-toplevel

        loaded = load(path_or_id, step=step, dtype=dtype)
        model = blip2.build(loaded.config, loaded.architecture)
        path = tokenizer or (loaded.tokenizer if loaded.config.text is None else "")
        return cls(model, loaded.params, tokenizer=qformer_tokenizer(path) if path else None, batch_size=batch_size)

    def _fn(self, key: str, fn: Callable, **kw) -> Callable:
        if key not in self._compiled:
            self._compiled[key] = _jitted(self.model, fn, tuple(sorted(kw.items())))
        return self._compiled[key]

    def images(self, images: Sequence[ImageInput], name: str = "itc_image") -> np.ndarray:
        """One of IMAGE_FEATURES for every image, in order."""
        check_feature(self.model, name)
        fn = self._fn(name, image_features, name=name)
        size = self.model.config.vision.image_size
        return self._batched(len(images), lambda rows: fn(self.params, preprocess_images([images[i] for i in rows],
                                                                                         size)))

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        """`itc_text` for every text (B, L, E), L the longest text's tokens rounded up to TEXT_BUCKET
        (rows past a text's end are its padding's, as transformers returns them); row 0 is ITC's."""
        ids, mask = self._tokens(texts)
        fn = self._fn("itc_text", text_features)
        return self._batched(len(texts), lambda rows: fn(self.params, ids[rows], mask[rows]))

    def multimodal(self, images: Sequence[ImageInput], texts: Sequence[str]) -> np.ndarray:
        """`multimodal` for each (image, text) pair."""
        if len(images) != len(texts):
            raise UserError(f"got {len(images)} images and {len(texts)} texts; multimodal features pair them")
        ids, mask = self._tokens(texts)
        fn = self._fn("multimodal", multimodal_features)
        size = self.model.config.vision.image_size
        return self._batched(len(texts), lambda rows: fn(
            self.params, preprocess_images([images[i] for i in rows], size), ids[rows], mask[rows]))

    def _tokens(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        return text_arrays(self.tokenizer, texts, self.model.config.qformer.max_position_embeddings)

    def _batched(self, count: int, run: Callable[[np.ndarray], jax.Array]) -> np.ndarray:
        """`run` over rows in batches of `batch_size` (the last padded with row 0, then dropped)."""
        out = []
        for start in range(0, count, self.batch_size):
            rows = np.arange(start, min(start + self.batch_size, count))
            padded = np.concatenate([rows, np.zeros(self.batch_size - len(rows), rows.dtype)])
            out.append(np.asarray(run(padded))[:len(rows)])
        return np.concatenate(out) if out else np.zeros((0,))


def text_arrays(tokenizer: Any, texts: Sequence[str], max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """Q-Former ids and mask (n, L) of `texts`, L the longest rounded up to TEXT_BUCKET."""
    if tokenizer is None:
        raise UserError("text features need the Q-Former's BERT tokenizer: give tokenizer=")
    lists = [tokenizer(t, truncation=True, max_length=max_positions)["input_ids"] for t in texts]
    width = -(-max(map(len, lists), default=1) // TEXT_BUCKET) * TEXT_BUCKET
    ids = np.full((len(texts), width), tokenizer.pad_token_id, np.int32)
    mask = np.zeros_like(ids)
    for row, tokens in enumerate(lists):
        ids[row, :len(tokens)], mask[row, :len(tokens)] = tokens, 1
    return ids, mask


@functools.lru_cache(maxsize=16)
def _on_mesh(model: Any, mesh: Any, fn: Callable, kw: tuple) -> Callable:
    from blip2_jax.evaluate.batches import jit_replicated  # pylint: disable=import-outside-toplevel

    return jit_replicated(functools.partial(fn, model=model, **dict(kw)), mesh)


class MeshFeatures:
    """A model's image features and ITC text rows over every device and host of `mesh` (`blip2-jax
    infer`): each host reads its rows of each global batch of `batch_size` per device; a row's
    features are the same on any mesh. `params` are placed on `mesh` (`evaluate.model.load_model`)."""

    def __init__(self, model: Any, params: Any, mesh: Any, *, batch_size: int, tokenizer: Any = None):
        self.model, self.params, self.mesh, self.batch_size, self.tokenizer = model, params, mesh, batch_size, tokenizer

    def images(self, images: Sequence[ImageInput], name: str) -> np.ndarray:
        from blip2_jax.evaluate.batches import map_batches  # pylint: disable=import-outside-toplevel

        check_feature(self.model, name)
        fn = _on_mesh(self.model, self.mesh, image_features, (("name", name),))
        size = self.model.config.vision.image_size
        return map_batches(self.mesh, len(images), self.batch_size,
                           lambda rows: {"x": preprocess_images([images[i] for i in rows], size)},
                           lambda g: fn(self.params, g["x"]))

    def itc_texts(self, texts: Sequence[str]) -> np.ndarray:
        """The [CLS] row of `itc_text` (n, E) for each text, the row ITC scores read."""
        from blip2_jax.evaluate.batches import map_batches  # pylint: disable=import-outside-toplevel

        ids, mask = text_arrays(self.tokenizer, texts, self.model.config.qformer.max_position_embeddings)
        fn = _on_mesh(self.model, self.mesh, text_features, ())
        return map_batches(self.mesh, len(texts), self.batch_size, lambda rows: {"ids": ids[rows], "mask": mask[rows]},
                           lambda g: fn(self.params, g["ids"], g["mask"])[:, 0])
