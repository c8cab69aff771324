"""Caption and question cleaning (LAVIS `blip_caption` / `blip_question`, spec §10) and the random
prefix/suffix split of FlanT5 prefix-LM pre-training (spec §7.2).

The cleaning rules are LAVIS's character for character, including its quirks: a caption's single
newline or tab survives (only runs of two or more whitespace characters collapse), a question keeps
its leading spaces and any trailing newline (only trailing spaces are stripped), and word counts
split on single spaces.
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np

# LAVIS's set: `. ! " ( ) * # : ; ~`. Commas, apostrophes, hyphens, slashes and '?' are kept.
PUNCTUATION = re.compile(r'[.!"()*#:;~]')
WHITESPACE_RUN = re.compile(r"\s{2,}")


class TextError(ValueError):
    """A record's text is missing, not a string, or empty after cleaning: the pipeline skips it."""


def _lowercase(text: Any, what: str) -> str:
    if not isinstance(text, str):
        raise TextError(f"a {what} must be a string, got {type(text).__name__}: {text!r:.80}")
    return text.lower()


def _first_words(text: str, max_words: int, what: str, original: str) -> str:
    if not text.strip():
        raise TextError(f"the {what} {original!r:.80} is empty after cleaning")
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


def pre_caption(caption: Any, max_words: int = 50, *, prompt: str = "") -> str:
    """`prompt` + the caption lowercased, its LAVIS punctuation replaced by spaces, whitespace runs
    collapsed, stripped, and cut to its first `max_words` words (the prompt is not counted)."""
    text = PUNCTUATION.sub(" ", _lowercase(caption, "caption"))
    text = WHITESPACE_RUN.sub(" ", text).rstrip("\n").strip(" ")
    return prompt + _first_words(text, max_words, "caption", caption)


def pre_question(question: Any, max_words: int = 50) -> str:
    """The question lowercased, its LAVIS punctuation deleted, trailing spaces stripped, cut to its
    first `max_words` words."""
    text = PUNCTUATION.sub("", _lowercase(question, "question")).rstrip(" ")
    return _first_words(text, max_words, "question", question)


def split_prefix(text: str, rng: np.random.Generator) -> tuple[str, str]:
    """(prefix, suffix) of `text` at a random word boundary, for FlanT5 prefix-LM pre-training.

    The unit is the space-separated word (the paper does not say; words keep the split independent
    of the tokenizer and never cut a word in two). The prefix length k is uniform in 1..n//2 for n
    words, so the suffix is never shorter than the prefix; a one-word text has an empty prefix and is
    all target, like an empty prompt.
    """
    words = text.split(" ")
    if len(words) < 2:
        return "", text
    k = int(rng.integers(1, len(words) // 2 + 1))
    return " ".join(words[:k]), " ".join(words[k:])
