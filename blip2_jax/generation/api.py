"""Captions and answers from a pretrained BLIP-2: images and prompts in, text out.

The LLM inputs are built as `transformers`' Blip2Processor builds them (spec §11.4): the tokenised
prompt (OPT's tokenizer prepends BOS, T5's appends `</s>`), preceded by Q `<image>` tokens when the
checkpoint has an `image_token_index`. Shapes are kept static so that a data set compiles a handful
of times, not once per batch: images go through in chunks of `batch_size` (fewer images: the next
power of two), the last chunk filled with copies of its first row whose outputs are dropped, and
prompts are padded to a multiple of `PROMPT_BUCKET` tokens (OPT on the left, T5 on the right).
Outputs are decoded without special tokens and stripped, as LAVIS does.
"""
from __future__ import annotations

import os
import string
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from blip2_jax.data.images import ImageInput, preprocess_images
from blip2_jax.data.tokenizers import instruction_tokenizer, language_tokenizer
from blip2_jax.errors import UserError
from blip2_jax.generation.config import CAPTION, PROMPTS, VQA_OPT, VQA_T5, GenerationConfig
from blip2_jax.generation.decode import decoding_params, generate_fn
from blip2_jax.generation.search import SearchOutput
from blip2_jax.models.blip2 import Blip2ForConditionalGeneration, InstructBlipForConditionalGeneration, build
from blip2_jax.models.config import Blip2Config, OPTConfig, T5Config
from blip2_jax.weights.load import load, open_source

PROMPT_BUCKET = 8  # prompt lengths round up to a multiple of this: one compile covers prompts of similar length
INSTRUCTION_LENGTH = 128  # InstructBLIP's instruction in the Q-Former, cut from the left (LAVIS max_txt_len)

GENERATORS = (Blip2ForConditionalGeneration.__name__, InstructBlipForConditionalGeneration.__name__)
Images = Sequence[ImageInput] | ImageInput  # a single image, a list of them, or a uint8 (B,H,W,3) array


def _image_list(images: Images) -> list[ImageInput]:
    if isinstance(images, (str, os.PathLike, Image.Image)) or (isinstance(images, np.ndarray) and images.ndim < 4):
        return [images]
    return list(images)


def _per_image(values: str | Sequence[str], n: int, what: str) -> list[str]:
    if isinstance(values, str):
        return [values] * n
    values = list(values)
    if len(values) != n:
        raise UserError(f"got {len(values)} {what} for {n} images: pass one for all or one per image")
    return values


def check_question_template(prompt: str, two_slots: bool = False) -> None:
    """A VQA prompt is `str.format`ted with the question: exactly one `{}` (a stray brace raised a
    bare IndexError, a prompt without one silently dropped the question). With `two_slots`, two are
    also allowed, as LAVIS's InstructBLIP fills them: a TextVQA question's OCR tokens then the
    question; a multiple-choice question then its choices."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(prompt) if name is not None]
    except ValueError:  # an unmatched brace
        fields = None
    if fields not in ([""], ["0"]) and not (two_slots and fields == ["", ""]):
        slots = "one {} where the question goes" + (" (or two: OCR tokens, question; question, choices)"
                                                     if two_slots else "")
        raise UserError(f"the VQA prompt {prompt!r} must hold exactly {slots} (write {{{{ and }}}} for literal "
                        "braces)")


def check_lengths(config: Blip2Config, token_lists: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    """OPT's learned position table ends at `max_position_embeddings`: the image queries, the longest
    prompt and every new token but the last (which is never fed back) must fit in it, the limit at
    which `transformers` raises an IndexError (past it a Flax `Embed` returns NaN: an empty or
    garbage caption and no error). T5's relative positions have no end."""
    text = config.text
    if not isinstance(text, OPTConfig):
        return
    longest = max((len(t) for t in token_lists), default=0)
    need = config.num_query_tokens + longest + max_new_tokens - 1
    if need > text.max_position_embeddings:
        room = text.max_position_embeddings - config.num_query_tokens - longest + 1
        raise UserError(f"max_new_tokens {max_new_tokens} is too many: {config.num_query_tokens} image queries + the "
                        f"longest prompt ({longest} tokens) + {max_new_tokens - 1} new tokens fed back need {need} "
                        f"positions, the language model has {text.max_position_embeddings}; pass max_new_tokens <= "
                        f"{max(room, 0)}")


def prompt_arrays(token_lists: Sequence[Sequence[int]], config: Blip2Config) -> tuple[np.ndarray, np.ndarray]:
    """input_ids and attention_mask (B, [Q +] bucketed length) for tokenised prompts, padded with the
    LLM's pad id on the side its generation expects (decoder-only: left)."""
    text = config.text
    width = -(-max(len(t) for t in token_lists) // PROMPT_BUCKET) * PROMPT_BUCKET
    ids = np.full((len(token_lists), width), text.pad_token_id, np.int32)
    mask = np.zeros_like(ids)
    for row, tokens in enumerate(token_lists):
        span = slice(width - len(tokens), width) if not text.is_encoder_decoder else slice(0, len(tokens))
        ids[row, span], mask[row, span] = tokens, 1
    if config.image_token_index is None:  # legacy checkpoints: the model prepends the visual prompt
        return ids, mask
    image = np.full((len(token_lists), config.num_query_tokens), config.image_token_index, np.int32)
    return np.concatenate([image, ids], 1), np.concatenate([np.ones_like(image), mask], 1)


def instruction_arrays(tokenizer: Any, prompts: Sequence[str], config: Blip2Config) -> tuple[np.ndarray, np.ndarray]:
    """InstructBLIP's Q-Former input for `prompts`: [CLS] ... [SEP] in its BERT vocabulary, cut from
    the left at INSTRUCTION_LENGTH (or the Q-Former's position table, if shorter), right-padded to a
    multiple of PROMPT_BUCKET within that."""
    limit = min(INSTRUCTION_LENGTH, config.qformer.max_position_embeddings)
    token_lists = [tokenizer(p, truncation=True, max_length=limit)["input_ids"] for p in prompts]
    width = min(-(-max(len(t) for t in token_lists) // PROMPT_BUCKET) * PROMPT_BUCKET, limit)
    ids = np.full((len(prompts), width), tokenizer.pad_token_id, np.int32)
    mask = np.zeros_like(ids)
    for row, tokens in enumerate(token_lists):
        ids[row, :len(tokens)], mask[row, :len(tokens)] = tokens, 1
    return ids, mask


class Blip2Generator:
    """A BLIP-2 (or InstructBLIP) model, its parameters and its LLM tokenizer (and InstructBLIP's
    Q-Former tokenizer), with one compiled generate per setting."""

    def __init__(self, model: Blip2ForConditionalGeneration, params: Any, tokenizer: Any, *, batch_size: int = 8,
                 qformer_tokenizer: Any = None):
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        if model.config.text is None:
            raise UserError("this is a BLIP-2 retrieval model (no language model): it cannot generate text")
        if model.config.instruction_aware and qformer_tokenizer is None:
            raise UserError("an InstructBLIP model reads each prompt in its Q-Former too: it needs the Q-Former "
                            "tokenizer (qformer_tokenizer)")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.qformer_tokenizer = qformer_tokenizer
        self.params = decoding_params(model, params)  # on the device and split per layer once, not per call
        self._compiled: dict[GenerationConfig, Callable[..., SearchOutput]] = {}

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, *, dtype: Any = None, batch_size: int = 8,
                        step: int | None = None, tokenizer: str | os.PathLike | None = None,
                        int8: Sequence[str] = ()) -> Blip2Generator:
        """From anything `weights.load` reads: a Hugging Face BLIP-2 directory (weights, config.json
        and the LLM tokenizer) or hub id, a model checkpoint, or a stage-2 training workdir (its
        latest step, or `step`).

        `tokenizer` (a directory or hub id) replaces the checkpoint's own. `dtype` (e.g. "bfloat16")
        is both the storage and the compute dtype; default float32. `int8` (dense-layer regexes, e.g.
        `quantization.TOWERS`) runs those layers of a float checkpoint with int8 kernels, quantized at load.
        """
        source = open_source(path_or_id, step)  # metadata only: the checks below come before the weights
        if source.architecture not in GENERATORS:
            raise UserError(f"{source.name} holds {source.architecture} weights; captions and answers need a "
                            "stage-2 checkpoint (Blip2ForConditionalGeneration or InstructBlipForConditionalGeneration:"
                            " a Q-Former and an LLM)")
        if not (tokenizer or source.tokenizer):
            raise UserError(f"{source.name} names no tokenizer: give the LLM's tokenizer (a directory or hub id)")
        qformer = instruction_tokenizer(tokenizer or source.tokenizer) if source.config.instruction_aware else None
        tokenizer = language_tokenizer(tokenizer or source.tokenizer)
        overrides = {} if dtype is None else dict(dtype=jnp.dtype(dtype).name, param_dtype=jnp.dtype(dtype).name)
        loaded = load(source, dtype=dtype, int8=int8, **overrides)
        return cls(build(loaded.config, source.architecture), loaded.params, tokenizer, batch_size=batch_size,
                   qformer_tokenizer=qformer)

    @property
    def config(self) -> Blip2Config:
        return self.model.config

    def caption(self, images: Images, prompt: str | Sequence[str] = "", config: GenerationConfig = CAPTION, *,
                rng: jax.Array | None = None) -> list[str]:
        """One caption per image continuing `prompt` (LAVIS's COCO captions use PROMPTS['caption']; the
        default CAPTION decodes as the paper-era LAVIS did, which counts the prompt in min_len)."""
        return self.generate(images, prompt, config, rng=rng)

    def answer(self, images: Images, questions: str | Sequence[str], prompt: str | None = None,
               config: GenerationConfig | None = None, *, rng: jax.Array | None = None) -> list[str]:
        """One answer per image to `prompt.format(question)`; defaults are the paper's zero-shot VQA
        prompt and search for the checkpoint's LLM, decoded as the public LAVIS code that matches
        it does (VQA_OPT: LAVIS@HEAD, VQA_T5: the paper era; generation/config.py; spec §6.4, §7.3)."""
        t5 = isinstance(self.config.text, T5Config)
        prompt = PROMPTS["vqa_t5" if t5 else "vqa_opt"] if prompt is None else prompt
        check_question_template(prompt)
        images = _image_list(images)
        prompts = [prompt.format(q) for q in _per_image(questions, len(images), "questions")]
        return self.generate(images, prompts, (VQA_T5 if t5 else VQA_OPT) if config is None else config, rng=rng)

    def generate(self, images: Images, prompts: str | Sequence[str], config: GenerationConfig, *,
                 rng: jax.Array | None = None) -> list[str]:
        """The text generated for each image after its prompt (one for all, or one per image).

        Sampling needs `rng`; each chunk uses `fold_in(rng, index of its first image)`.
        """
        if config.num_return_sequences != 1:
            raise ValueError(f"captions and answers are one text per image; num_return_sequences is "
                             f"{config.num_return_sequences} (use generation.decode.generate_fn for several)")
        images = _image_list(images)
        prompts = _per_image(prompts, len(images), "prompts")
        if not images:
            return []
        token_lists = self.tokenizer(prompts)["input_ids"]
        check_lengths(self.config, token_lists, config.max_new_tokens)
        rows = min(self.batch_size, 1 << (len(images) - 1).bit_length())
        if config not in self._compiled:
            self._compiled[config] = generate_fn(self.model, config)
        texts = []
        for start in range(0, len(images), rows):
            real = min(rows, len(images) - start)
            pixels = preprocess_images(images[start:start + real], self.config.vision.image_size)
            pixels = np.concatenate([pixels, np.repeat(pixels[:1], rows - real, 0)])
            ids, mask = prompt_arrays(token_lists[start:start + real] + [token_lists[start]] * (rows - real),
                                      self.config)
            keys = () if rng is None else (jax.random.fold_in(rng, start),)
            instruction = {}
            if self.qformer_tokenizer is not None:  # the prompt also reaches InstructBLIP's Q-Former
                chunk = prompts[start:start + real] + [prompts[start]] * (rows - real)
                qids, qmask = instruction_arrays(self.qformer_tokenizer, chunk, self.config)
                instruction = dict(qformer_input_ids=qids, qformer_attention_mask=qmask)
            out = self._compiled[config](self.params, pixels, ids, mask, *keys, **instruction)
            tokens, lengths = np.asarray(out.tokens[:real, 0]), np.asarray(out.lengths[:real, 0])
            texts += self.tokenizer.batch_decode([t[:n].tolist() for t, n in zip(tokens, lengths)],
                                                 skip_special_tokens=True)
        return [t.strip() for t in texts]
