"""Generation settings, and which reference's decoding rules they follow (`semantics`).

`max_new_tokens` is the number of tokens generated at most in every mode (it sizes the compiled
loop). The modes differ in what else counts (spec §6.3, §7.3):

- `transformers` (default): `transformers.generate` 5.x on the processor's inputs. Lengths count
  generated tokens only (`min_new_tokens`); a beam is scored sum log p / n**length_penalty (n new
  tokens, EOS included); the repetition penalty sees every input id (image tokens, BOS, prompt,
  padding; T5: the decoder start token) and the generated ids.
- `lavis`: LAVIS@HEAD's `Blip2OPT`/`Blip2T5` `generate`/`predict_answers` under its pinned
  transformers 4.33.2, which pass the prompt as `inputs_embeds` only. The LM's token history starts
  with c = 1 counted token (OPT: a dummy BOS; T5: the decoder start token): EOS is forbidden while
  c + generated < `min_length` (so min_length 1 sets no minimum); a beam ending on EOS is scored
  / (c + n - 1)**lp, one stopped at `max_new_tokens` / (c + n)**lp and every running beam then
  competes (not only the top num_beams candidates); beam search stops early when the best of the
  2*num_beams candidates / (c + step + 1)**lp cannot beat the worst finished score; the repetition
  penalty sees the c counted ids and the generated ids. (LAVIS's OPT `max_length` 30 counts the
  dummy BOS: 29 new tokens; its `max_new_tokens` does not.)
- `lavis_paper`: the paper-era code (LAVIS@85907dd, transformers 4.26) behind Table 3: OPT was
  given the prompt ids (BOS + prompt) as `input_ids`, so c = those ids (at least
  min_length - c new tokens: 4 for "a photo of" and min_len 8); T5 as in `lavis`. Scores as in
  `lavis`, but the early stop divides by (c + step)**lp (4.26's heuristic) and early_stopping
  "never" did not exist.

The dataclass is frozen and hashable, so it is a static argument of the compiled generate.
"""
from __future__ import annotations

import dataclasses

from blip2_jax.errors import UserError

SEMANTICS = ("transformers", "lavis", "lavis_paper")


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 30
    min_new_tokens: int = 0  # transformers mode: EOS is forbidden until this many tokens were generated
    min_length: int = 0  # lavis modes: LAVIS's min_len, the counted prefix c included (module docstring)
    num_beams: int = 1
    do_sample: bool = False  # with num_beams == 1: sample instead of argmax
    temperature: float = 1.0  # sampling only
    top_k: int = 50  # sampling only; 0 = off (transformers' default is 50)
    top_p: float = 1.0  # sampling only (nucleus); 1 = off
    repetition_penalty: float = 1.0  # CTRL-style, over the ids the mode's history holds
    length_penalty: float = 1.0  # beam search: finished score = sum log p / length ** length_penalty
    early_stopping: bool | str = False  # beam search: True, False (the heuristic) or "never"
    num_return_sequences: int = 1  # <= num_beams for beam search; independent samples otherwise
    eos_token_id: int | None = None  # None: the language model config's
    pad_token_id: int | None = None  # None: the language model config's
    semantics: str = "transformers"  # transformers | lavis | lavis_paper: whose decoding rules

    def __post_init__(self):
        if self.semantics not in SEMANTICS:
            raise UserError(f"semantics must be one of {SEMANTICS}, got {self.semantics!r}")
        if self.max_new_tokens < 1 or not 0 <= self.min_new_tokens <= self.max_new_tokens or self.min_length < 0:
            raise UserError(f"need 0 <= min_new_tokens <= max_new_tokens, max_new_tokens >= 1 and min_length >= 0, "
                             f"got {self.min_new_tokens}, {self.max_new_tokens}, {self.min_length}")
        if self.semantics == "transformers" and self.min_length:
            raise UserError(f"min_length ({self.min_length}) is LAVIS's count (semantics 'lavis' or "
                             f"'lavis_paper'); with semantics 'transformers' use min_new_tokens")
        if self.semantics != "transformers" and self.min_new_tokens:
            raise UserError(f"semantics {self.semantics!r} counts minimums as LAVIS does: set min_length "
                             f"(LAVIS's min_len), not min_new_tokens ({self.min_new_tokens})")
        if self.num_beams < 1 or self.num_return_sequences < 1:
            raise UserError(f"num_beams and num_return_sequences must be >= 1, got {self.num_beams}, "
                             f"{self.num_return_sequences}")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise UserError(f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams "
                             f"({self.num_beams}) for beam search")
        if self.num_beams > 1 and self.do_sample:
            raise UserError("beam sampling (num_beams > 1 with do_sample) is not implemented; use num_beams=1 "
                             "to sample or do_sample=False for beam search")
        if self.early_stopping not in (True, False, "never"):
            raise UserError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if self.semantics == "lavis_paper" and self.early_stopping == "never":
            raise UserError("early_stopping 'never' did not exist in the paper-era transformers (4.26); "
                             "use True or False with semantics 'lavis_paper'")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.repetition_penalty <= 0:
            raise UserError(f"need temperature > 0, 0 < top_p <= 1, top_k >= 0, repetition_penalty > 0; got "
                             f"{self.temperature}, {self.top_p}, {self.top_k}, {self.repetition_penalty}")


# The settings behind the published numbers (spec §6.3, §6.4, §7.3), each in the mode of the code
# that produced them.
# COCO captions (Table 3): caption_coco_opt*.yaml's beam 5, max_len 30, min_len 8, penalties 1.0, as
# the paper-era Blip2OPT/Blip2T5.generate ran them ("a photo of" counts in OPT's min_len: >= 4 new).
CAPTION = GenerationConfig(semantics="lavis_paper", num_beams=5, max_new_tokens=30, min_length=8)
# CapFilt's captions (paper §3.4, nucleus sampling): the paper-era generate with use_nucleus_sampling,
# which sets num_beams 1 and defaults top_p to 0.9 (transformers' top_k 50 stays on), lengths as above.
CAPFILT = dataclasses.replace(CAPTION, num_beams=1, do_sample=True, top_p=0.9)
# A stage-1 model's captions (its Q-Former's ITG head): LAVIS's Blip2Qformer.generate defaults, beam 3,
# max_length 30 and min_length 10, both counting the [DEC] it starts from; nucleus sampling as above.
STAGE1_CAPTION = GenerationConfig(semantics="lavis", num_beams=3, max_new_tokens=29, min_length=10)
STAGE1_CAPFILT = dataclasses.replace(STAGE1_CAPTION, num_beams=1, do_sample=True, top_p=0.9)
# Zero-shot VQA (Table 2): beam 5, 10 new tokens, min_len 1 (no minimum), the paper's length penalty -1.
# The paper-era OPT had no VQA code: LAVIS@HEAD's Blip2OPT.predict_answers is the public one.
VQA_OPT = GenerationConfig(semantics="lavis", num_beams=5, max_new_tokens=10, min_length=1, length_penalty=-1.0)
# FlanT5's is the paper-era Blip2T5.predict_answers (its default length penalty is -1).
VQA_T5 = dataclasses.replace(VQA_OPT, semantics="lavis_paper")
PROMPTS = {"caption": "a photo of", "vqa_opt": "Question: {} Answer:", "vqa_t5": "Question: {} Short answer:"}
