"""Word-level tokenizers over easy-VQA's vocabulary, built in-process (nothing to download).

Both are saved as ordinary `transformers` tokenizer directories, so every path that loads a
tokenizer by name (the data pipeline, `convert to-hf`, `Blip2Processor`) takes them as it takes
BERT's and OPT's. Ids are fixed: the demo model presets (`models/presets.py`, `demo*`) are sized
for them, 64 entries each.
"""
from __future__ import annotations

from pathlib import Path

from blip2_jax.data import easy_vqa
from blip2_jax.models.presets import DEMO_IMAGE_TOKEN, DEMO_OPT

_WORDS = sorted({"a", "color", "contain", "does", "image", "in", "is", "no", "not", "of", "present", "shape", "the",
                 "there", "what", "yes", "question", "answer", *easy_vqa.COLORS, *easy_vqa.SHAPES}) + ["?", ":", "."]
# The instruction demo's templates (demo/configs.py INSTRUCTIONS) also say these. Appended, so every
# earlier word keeps its id: the main demo's runs are the same with or without them.
_WORDS += ["q", "short", "to"]
VOCAB_SIZE = 64
# OPT-style specials at the ids the demo preset names; "\n" ends every text, as "\n" ends BLIP-2's OPT captions.
_LM_SPECIALS = ["<pad>", "<s>", "\n", "</s>", "<unk>", "<image>"]
_BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _padded(tokens: list[str], size: int) -> list[str]:
    return tokens + [f"[unused{i}]" for i in range(size - len(tokens))]


def write_qformer_tokenizer(directory: str | Path) -> Path:
    """A BERT `vocab.txt` (63 entries; `qformer_tokenizer` adds [DEC] as id 63)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(_padded(_BERT_SPECIALS + _WORDS, VOCAB_SIZE - 1)) + "\n")
    return directory


def write_language_tokenizer(directory: str | Path) -> Path:
    """The LM's tokenizer: words and punctuation split, BOS prepended as OPT's tokenizer does."""
    import transformers  # pylint: disable=import-outside-toplevel
    from tokenizers import Tokenizer, models, pre_tokenizers, processors  # pylint: disable=import-outside-toplevel

    vocab = _padded(_LM_SPECIALS + _WORDS, VOCAB_SIZE)
    if vocab.index("<pad>") != DEMO_OPT.pad_token_id or vocab.index("<s>") != DEMO_OPT.bos_token_id or \
            vocab.index("\n") != DEMO_OPT.eos_token_id or vocab.index("<image>") != DEMO_IMAGE_TOKEN:
        raise AssertionError("the demo tokenizer's special ids disagree with the demo model preset")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(" ", "removed"),
                                                 pre_tokenizers.Split("\n", "isolated"),
                                                 pre_tokenizers.Punctuation("isolated")])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.add_special_tokens(["<pad>", "<s>", "</s>", "<unk>", "<image>"])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>")
    directory = Path(directory)
    fast.save_pretrained(directory)
    return directory
