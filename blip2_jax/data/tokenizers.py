"""Tokenizers of the three text towers, and the fixed-shape token arrays each objective reads.

The Q-Former's is BERT's with `[DEC]` added as the bos token (id 30522 for bert-base-uncased,
vocabulary 30523), truncating on the right (spec §4). OPT's prepends BOS `</s>` and ends a caption
with "\\n", whose id is OPT's eos at generation (spec §6.1); FlanT5's appends `</s>` (spec §7.1).

Encoders take one record's text and return 1-D int32 arrays padded to a fixed length (LAVIS pads
to the longest in the batch; a fixed length keeps the jitted step's shapes static, and the extra
padding is masked). Truncation is on the right and counts the special tokens, as in LAVIS.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from blip2_jax.errors import InputNotFound

IGNORE = -100  # the label every loss skips (torch's cross-entropy ignore_index, as LAVIS uses it)

DEC_TOKEN = "[DEC]"


def qformer_tokenizer(path_or_id: str | os.PathLike = "bert-base-uncased", truncation_side: str = "right",
                      **kwargs):
    """BERT tokenizer + `[DEC]` as bos; `[DEC]` gets the first id after BERT's vocabulary.
    InstructBLIP cuts an instruction from the left (LAVIS), keeping its question at the end."""
    from transformers import BertTokenizerFast  # pylint: disable=import-outside-toplevel

    tokenizer = BertTokenizerFast.from_pretrained(str(path_or_id), truncation_side=truncation_side, **kwargs)
    tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    return tokenizer


INSTRUCTION_TOKENIZER_DIR = "qformer_tokenizer"  # where InstructBlipProcessor saves the Q-Former's tokenizer


def instruction_tokenizer(path_or_id: str | os.PathLike):
    """InstructBLIP's Q-Former tokenizer from the directory (or hub id) of its processor, which keeps
    it in a `qformer_tokenizer/` subfolder beside the LLM's; it cuts from the left, as LAVIS's."""
    local = Path(path_or_id) / INSTRUCTION_TOKENIZER_DIR
    if local.is_dir():
        return qformer_tokenizer(local, truncation_side="left")
    if Path(path_or_id).is_dir():
        raise InputNotFound(f"{path_or_id} has no {INSTRUCTION_TOKENIZER_DIR}/: an InstructBLIP model's Q-Former "
                            "tokenizer is expected there, as InstructBlipProcessor saves it")
    return qformer_tokenizer(path_or_id, truncation_side="left", subfolder=INSTRUCTION_TOKENIZER_DIR)


# Any of these marks a directory that `AutoTokenizer` can load (fast, GPT-2 BPE, SentencePiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model", "tokenizer.model")


def language_tokenizer(path_or_id: str | os.PathLike):
    """The OPT (GPT-2 BPE) or FlanT5 (SentencePiece) tokenizer from a local directory or hub id;
    `AutoTokenizer` picks the class, with the same ids as the slow/fast classes LAVIS names."""
    from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel

    directory = Path(path_or_id)
    if directory.is_dir() and not any((directory / f).is_file() for f in TOKENIZER_FILES):
        raise InputNotFound(
            f"{directory} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): save the language model's "
            "tokenizer there, e.g. Blip2Processor.from_pretrained(<hub id>).save_pretrained(<dir>)")
    return AutoTokenizer.from_pretrained(str(path_or_id))


class Memoized:
    """A tokenizer that remembers the ids of the last `size` distinct (text, arguments) it was called
    with: a record's texts repeat (a caption every epoch, a prompt in every record, a VQA set's
    few hundred questions), and the Hugging Face call costs ~0.1 ms of Python for what is then a
    dictionary lookup. Calls return {"input_ids": a tuple}; every attribute is the tokenizer's."""

    def __init__(self, tokenizer: Any, size: int = 1 << 16):
        self.tokenizer, self.size = tokenizer, size
        self._ids: dict[tuple, tuple[int, ...]] = {}

    def __call__(self, text: str, **kwargs) -> dict[str, tuple[int, ...]]:
        key = (text, *sorted(kwargs.items()))
        ids = self._ids.get(key)
        if ids is None:
            if len(self._ids) >= self.size:
                self._ids.clear()  # cheaper than an LRU's bookkeeping, and a rare event
            ids = self._ids[key] = tuple(self.tokenizer(text, **kwargs)["input_ids"])
        return {"input_ids": ids}

    def __getattr__(self, name: str) -> Any:
        if name == "tokenizer":  # not yet set (while unpickling)
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    def __reduce__(self):  # to a Grain worker process: the tokenizer, with an empty memory
        return Memoized, (self.tokenizer, self.size)


def opt_eos_token_id(tokenizer: Any) -> int:
    """The id LAVIS stops OPT generation at: the first token of "\\n" without specials (50118)."""
    ids = tokenizer("\n", add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("the tokenizer maps '\\n' to no token: it cannot mark the end of an OPT caption")
    return ids[0]


def _encode(tokenizer: Any, text: str, max_length: int) -> list[int]:
    return tokenizer(text, truncation=True, max_length=max_length)["input_ids"]


def _pad(ids: list[int], length: int, pad_id: int, left: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask), both (length,) int32, with padding on the right or the left."""
    if pad_id is None:
        raise ValueError("the tokenizer has no pad token (OPT's, T5's and BERT's all have one)")
    out = np.full(length, pad_id, np.int32)
    mask = np.zeros(length, np.int32)
    span = slice(length - len(ids), length) if left else slice(0, len(ids))
    out[span], mask[span] = ids, 1
    return out, mask


def _require_bos(tokenizer: Any, ids: list[int]) -> None:
    if not ids or ids[0] != tokenizer.bos_token_id:
        raise ValueError(f"OPT text must start with BOS (id {tokenizer.bos_token_id}), got ids {ids[:4]}: "
                         "use a tokenizer that prepends it, as OPT's does")


def _require_eos(tokenizer: Any, ids: list[int]) -> None:
    if not ids or ids[-1] != tokenizer.eos_token_id:
        raise ValueError(f"T5 text must end with </s> (id {tokenizer.eos_token_id}), got ids {ids[-4:]}: "
                         "use a tokenizer that appends it, as T5's does")


def qformer_text(tokenizer: Any, text: str, max_length: int = 32) -> dict[str, np.ndarray]:
    """Stage-1 text `[CLS] w... [SEP] [PAD]...` (spec §4; retrieval evaluation uses max_length 35)."""
    ids, mask = _pad(_encode(tokenizer, text, max_length), max_length, tokenizer.pad_token_id)
    return {"text_ids": ids, "text_mask": mask}


def opt_labels(text_ids: np.ndarray, text_mask: np.ndarray, prompt_length: np.ndarray | int) -> np.ndarray:
    """LAVIS OPT targets (B,L): padding and the first `prompt_length` tokens (BOS + prompt; an
    int or per-sample (B,)) become IGNORE. With prompt_length 0, BOS stays a target. NumPy: it
    runs per record in the input pipeline's threads, where a jnp call would dispatch to the device."""
    positions = np.arange(np.shape(text_ids)[1])[None, :]
    in_prompt = positions < np.reshape(np.asarray(prompt_length), (-1, 1))
    return np.where((np.asarray(text_mask) == 0) | in_prompt, IGNORE, np.asarray(text_ids)).astype(np.int32)


def opt_text(tokenizer: Any, text: str, prompt: str = "", max_length: int = 32) -> dict[str, np.ndarray]:
    """Stage-2 OPT text: BOS + `text` + "\\n", right-padded (spec §6.2), and `prompt_length`, the
    tokens of BOS + `prompt` that `opt_labels` masks out of the loss (0 for no
    prompt: BOS stays a target). `text` already starts with the prompt (the caption processor adds it).
    A text cut at `max_length` loses its "\\n", as in LAVIS.
    """
    if not text.startswith(prompt):
        raise ValueError(f"the text {text!r:.80} does not start with the prompt {prompt!r}: the prompt tokens "
                         "would mask part of the caption (prepend it with pre_caption(..., prompt=...))")
    ids = _encode(tokenizer, text + "\n", max_length)
    _require_bos(tokenizer, ids)
    text_ids, text_mask = _pad(ids, max_length, tokenizer.pad_token_id)
    prompt_length = len(_encode(tokenizer, prompt, max_length)) if prompt else 0
    return {"text_ids": text_ids, "text_mask": text_mask, "prompt_length": np.int32(prompt_length)}


def llama_text(tokenizer: Any, text_input: str, text_output: str, max_length: int,
               max_input_length: int) -> dict[str, np.ndarray]:
    """InstructBLIP-Vicuna's LLM text (LAVIS `concat_text_input_output`): BOS + the instruction, then
    the answer + EOS without a BOS of its own, right-padded to `max_length`; `prompt_length` (BOS +
    instruction) is no target. An instruction longer than `max_input_length` loses its start (LAVIS
    truncates it from the left, keeping BOS); the answer is cut at the end."""
    ids_in = tokenizer(text_input)["input_ids"]
    _require_bos(tokenizer, ids_in)
    if len(ids_in) > max_input_length:
        ids_in = ids_in[:1] + ids_in[len(ids_in) - max_input_length + 1:]
    ids_out = tokenizer(text_output + tokenizer.eos_token)["input_ids"]
    ids_out = ids_out[1:] if ids_out and ids_out[0] == tokenizer.bos_token_id else ids_out
    text_ids, text_mask = _pad((ids_in + ids_out)[:max_length], max_length, tokenizer.pad_token_id)
    return {"text_ids": text_ids, "text_mask": text_mask, "prompt_length": np.int32(min(len(ids_in), max_length))}


def opt_context(tokenizer: Any, context: str, length: int) -> dict[str, np.ndarray]:
    """Text before OPT's BOS, where BLIP-2 puts the image's query embeddings (spec §6.2): its tokens
    without special tokens, left-padded to `length` so that it ends right before BOS, as the queries
    do. The demo's LM learns its captions there, the slot stage 2 then fills with the visual prompt."""
    ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    if not 0 < len(ids) <= length:
        raise ValueError(f"the context {context!r:.80} has {len(ids)} tokens; data.context_length is {length}")
    context_ids, context_mask = _pad(ids, length, tokenizer.pad_token_id, left=True)
    return {"context_ids": context_ids, "context_mask": context_mask}


def opt_prompt(tokenizer: Any, prompt: str, max_length: int = 32) -> dict[str, np.ndarray]:
    """A generation prompt for OPT: BOS + prompt, left-padded so that every row's last position is
    its last prompt token (spec §6.4)."""
    ids = _encode(tokenizer, prompt, max_length)
    _require_bos(tokenizer, ids)
    prompt_ids, prompt_mask = _pad(ids, max_length, tokenizer.pad_token_id, left=True)
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask}


def t5_text(tokenizer: Any, text_input: str, text_output: str, max_input_length: int = 32,
            max_output_length: int = 32) -> dict[str, np.ndarray]:
    """Stage-2 FlanT5 prefix and target, each ending with </s> and right-padded (spec §7.2)."""
    out = {}
    for name, text, length in (("input", text_input, max_input_length), ("output", text_output, max_output_length)):
        ids = _encode(tokenizer, text, length)
        _require_eos(tokenizer, ids)
        out[f"{name}_ids"], out[f"{name}_mask"] = _pad(ids, length, tokenizer.pad_token_id)
    return out


def stage2_text(kind: str, tokenizer: Any, text_input: str, text_output: str, text_length: int,
                instruction_length: int = 0) -> dict[str, np.ndarray]:
    """A stage-2 row's text arrays (`objectives/stage2.py::batch_spec`) for `kind` 'stage2_opt',
    'stage2_llama' or 'stage2_t5': `text_input` (the prompt) is no target, `text_output` is."""
    if kind == "stage2_t5":
        return t5_text(tokenizer, text_input, text_output, text_length, text_length)
    if kind == "stage2_opt":
        out = opt_text(tokenizer, f"{text_input} {text_output}".strip(), prompt=text_input, max_length=text_length)
    else:  # LAVIS's Vicuna: instruction and answer tokenised apart, the instruction cut as the Q-Former's
        out = llama_text(tokenizer, text_input, text_output, text_length, instruction_length or text_length)
    labels = opt_labels(out["text_ids"][None], out["text_mask"][None], out.pop("prompt_length"))
    return {**out, "labels": labels[0]}
