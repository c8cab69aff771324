"""Generation settings, with the meaning `transformers.generate` gives each field.

Lengths count generated tokens only (`max_new_tokens`, `min_new_tokens`), whatever the prompt:
the image queries, BOS and the text prompt are not counted, as in LAVIS at HEAD (spec §6.3).
The dataclass is frozen and hashable, so it is a static argument of the compiled generate.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 30
    min_new_tokens: int = 0  # EOS is forbidden until this many tokens were generated
    num_beams: int = 1
    do_sample: bool = False  # with num_beams == 1: sample instead of argmax
    temperature: float = 1.0  # sampling only
    top_k: int = 50  # sampling only; 0 = off (transformers' default is 50)
    top_p: float = 1.0  # sampling only (nucleus); 1 = off
    repetition_penalty: float = 1.0  # CTRL-style, over the prompt ids and the generated ids
    length_penalty: float = 1.0  # beam search: finished score = sum log p / new_tokens ** length_penalty
    early_stopping: bool | str = False  # beam search: True, False (transformers' heuristic) or "never"
    num_return_sequences: int = 1  # <= num_beams for beam search; independent samples otherwise
    eos_token_id: int | None = None  # None: the language model config's
    pad_token_id: int | None = None  # None: the language model config's

    def __post_init__(self):
        if self.max_new_tokens < 1 or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"need 0 <= min_new_tokens <= max_new_tokens and max_new_tokens >= 1, got "
                             f"{self.min_new_tokens}, {self.max_new_tokens}")
        if self.num_beams < 1 or self.num_return_sequences < 1:
            raise ValueError(f"num_beams and num_return_sequences must be >= 1, got {self.num_beams}, "
                             f"{self.num_return_sequences}")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise ValueError(f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams "
                             f"({self.num_beams}) for beam search")
        if self.num_beams > 1 and self.do_sample:
            raise ValueError("beam sampling (num_beams > 1 with do_sample) is not implemented; use num_beams=1 "
                             "to sample or do_sample=False for beam search")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.repetition_penalty <= 0:
            raise ValueError(f"need temperature > 0, 0 < top_p <= 1, top_k >= 0, repetition_penalty > 0; got "
                             f"{self.temperature}, {self.top_p}, {self.top_k}, {self.repetition_penalty}")


# The settings that reproduce the paper's numbers (spec §6.3, §6.4, §7.3).
CAPTION = GenerationConfig(num_beams=5, max_new_tokens=30, min_new_tokens=8)  # caption_coco_opt*.yaml
VQA_OPT = GenerationConfig(num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0)  # paper §4.1
VQA_T5 = VQA_OPT  # "Question: {} Short answer:", same search settings
PROMPTS = {"caption": "a photo of", "vqa_opt": "Question: {} Answer:", "vqa_t5": "Question: {} Short answer:"}
