"""Word-level tokenizers built in-process (nothing downloaded) with the ids a test's tiny model expects."""
from __future__ import annotations

import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors


def word_tokenizer(vocabulary: list[str], template: str, special_ids: dict[str, int],
                   **special_tokens: str) -> transformers.PreTrainedTokenizerFast:
    """Ids in `vocabulary` order; words split on spaces with "\\n" its own token; `template` is the
    post-processor (OPT: "<s> $A", T5: "$A </s>") over the specials in `special_ids`."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocabulary)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(" ", "removed"),
                                                 pre_tokenizers.Split("\n", "isolated")])
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=list(special_ids.items()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **special_tokens)


def tiny_opt_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Word-level, ids matching the parity tests' tiny OPT (`<s>` 0 = bos, `<pad>` 1, `</s>` 2 = eos,
    `<image>` 4 = image_token_index), prepending BOS as OPT's tokenizer does."""
    from tests.reference import hf_models  # pylint: disable=import-outside-toplevel

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<image>"]
    words = ["a", "photo", "of", "Question", ":", "Answer", "?", "what", "is", "the"]
    words += [f"w{i}" for i in range(hf_models.OPT["vocab_size"] - len(specials) - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.add_special_tokens(specials)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>")
