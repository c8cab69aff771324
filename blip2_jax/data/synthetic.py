"""Synthetic batches of the shapes the BLIP-2 objectives take: for smoke tests, benchmarks and
the exactness tests of training (resume, multi-device, multi-host). Real data is `data/pipeline.py`.

Every row of the global batch is drawn from its own seed `(seed, step, row)`, so a host that
builds only its rows produces exactly its slice of the batch a single host would build: the same
run on 1 process or N gives the same global batches. The iterator state is the next step.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from blip2_jax.data.spec import BatchSpec, conform
from blip2_jax.data.tokenizers import opt_labels


KINDS = ("stage1", "stage2_opt", "stage2_llama", "stage2_t5", "lm_opt", "lm_llama")


@dataclasses.dataclass(frozen=True)
class SyntheticData:
    """Batches for `kind` (KINDS); with the objective's `spec` (`data/spec.py`), also its optional
    inputs (ITC positives, an LM context, InstructBLIP's instruction below `instruction_vocab_size`),
    and checked."""

    kind: str
    global_batch_size: int
    image_size: int
    text_length: int
    vocab_size: int
    seed: int = 0
    bos_token_id: int = 2
    prompt_length: int = 0
    spec: BatchSpec | None = None
    instruction_vocab_size: int = 100

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown synthetic data kind {self.kind!r}")

    def _row(self, step: int, row: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, step, row])
        s, length = self.image_size, self.text_length
        n = int(rng.integers(2, length + 1))  # real tokens, the rest padding
        ids = np.zeros(length, np.int32)
        ids[:n] = rng.integers(5, self.vocab_size, n)
        mask = (np.arange(length) < n).astype(np.int32)
        out = {"image": rng.standard_normal((s, s, 3)).astype(np.float32)}
        if self.kind == "stage1":
            ids[0] = 1  # a [CLS]-like first token that ITG replaces by [DEC]
            out.update(text_ids=ids, text_mask=mask)
        elif self.kind.startswith("lm_"):
            ids[0] = self.bos_token_id
            out = dict(text_ids=ids, text_mask=mask, labels=opt_labels(ids[None], mask[None], 0)[0])
        elif self.kind != "stage2_t5":  # decoder-only: OPT, LLaMA
            ids[0] = self.bos_token_id
            labels = opt_labels(ids[None], mask[None], self.prompt_length)[0]
            out.update(text_ids=ids, text_mask=mask, labels=labels)
        else:
            m = int(rng.integers(1, length + 1))
            out_ids = np.zeros(length, np.int32)
            out_ids[:m] = rng.integers(5, self.vocab_size, m)
            out.update(input_ids=ids, input_mask=mask, output_ids=out_ids,
                       output_mask=(np.arange(length) < m).astype(np.int32))
        if self.spec is None:
            return out
        if "image_id" in self.spec:  # a few equal ids per batch: positives beyond the pair itself
            out["image_id"] = np.int32(rng.integers(0, max(1, self.global_batch_size // 2)))
        if "qformer_ids" in self.spec:  # right-padded, as the Q-Former's tokenizer pads
            width = self.spec["qformer_ids"].shape[0]
            n = int(rng.integers(1, width + 1))
            out["qformer_ids"] = np.zeros(width, np.int32)
            out["qformer_ids"][:n] = rng.integers(5, self.instruction_vocab_size, n)
            out["qformer_mask"] = (np.arange(width) < n).astype(np.int32)
        if "context_ids" in self.spec:  # left-padded, as tokenizers.opt_context pads
            width = self.spec["context_ids"].shape[0]
            c = int(rng.integers(1, width + 1))
            out["context_ids"] = np.zeros(width, np.int32)
            out["context_ids"][width - c:] = rng.integers(5, self.vocab_size, c)
            out["context_mask"] = (np.arange(width) >= width - c).astype(np.int32)
        return conform(out, self.spec, f"synthetic row {row} of batch {step}")

    def batch(self, step: int, rows: range | None = None) -> dict[str, np.ndarray]:
        """The rows `rows` (default: all) of global batch number `step`."""
        rows = range(self.global_batch_size) if rows is None else rows
        per_row = [self._row(step, r) for r in rows]
        return {k: np.stack([r[k] for r in per_row]) for k in per_row[0]}
