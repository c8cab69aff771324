"""Tokenizers of the three text towers, loaded from a local directory or a hub id.

The Q-Former's is BERT's with `[DEC]` added as the bos token (id 30522 for bert-base-uncased,
vocabulary 30523), truncating on the right (spec §4).
"""
from __future__ import annotations

import os

DEC_TOKEN = "[DEC]"


def qformer_tokenizer(path_or_id: str | os.PathLike = "bert-base-uncased"):
    """BERT tokenizer + `[DEC]` as bos; `[DEC]` gets the first id after BERT's vocabulary."""
    from transformers import BertTokenizerFast  # pylint: disable=import-outside-toplevel

    tokenizer = BertTokenizerFast.from_pretrained(str(path_or_id), truncation_side="right")
    tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    return tokenizer
