"""The trainer's input: synthetic batches or a Grain pipeline over a real source, one interface.

`make_loader(config, kind, image_size, vocab_size, spec)` reads `config.data`: `source` is 'synthetic' (per-row
seeded random arrays, the exactness tests' data), 'json' (LAVIS annotation files + image root),
'arrayrecord' (shards from `blip2-jax data build`), 'tfds', 'webdataset' (tar shards,
`data/webdataset.py`), 'parquet' (`data/parquet.py`), 'easy_vqa' (its questions),
'easy_vqa_captions' or 'easy_vqa_text' (`data/easy_vqa.py`: the demo's captions and LM text);
`mixture` draws from several of them by weight. Real records become the arrays the objective
takes (`RecordProcessor`): the LAVIS train transform and caption cleaning, then the Q-Former, OPT
or FlanT5 tokenisation at `data.text_length`. The loader's state (next step,
iterator position, skipped-record counters) is saved with every checkpoint, so a resumed run reads
exactly the batches the uninterrupted run would have read.
"""
from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import Any, Protocol

import jax
import ml_collections
import numpy as np

from blip2_jax.data import easy_vqa
from blip2_jax.data.instructions import TEMPLATES, first_answer, instruction_texts
from blip2_jax.data import sources as sources_lib
from blip2_jax.data.sources import RECORD_KINDS
from blip2_jax.data import tokenizers, transforms
from blip2_jax.data.pipeline import Mixture, make_pipeline
from blip2_jax.data.spec import BatchSpec, conform
from blip2_jax.data.synthetic import SyntheticData
from blip2_jax.data.text import pre_caption, pre_question, split_prefix
from blip2_jax.errors import UserError

TRANSFORMS = {"blip2_image_train": transforms.blip2_image_train, "blip_image_train": transforms.blip_image_train,
              "blip_image_eval": transforms.blip_image_eval}


class Loader(Protocol):
    """This host's rows of consecutive global batches, with a position that checkpoints can hold."""

    def next(self) -> dict[str, np.ndarray]: ...

    def get_state(self) -> dict[str, Any]: ...

    def set_state(self, state: dict[str, Any]) -> None: ...

    @property
    def stats(self) -> dict[str, Any]: ...


class SyntheticLoader:
    """`SyntheticData` rows of batch `step`, one step after another; the state is the next step."""

    def __init__(self, data: SyntheticData, rows: range):
        self.data, self.rows, self.step = data, rows, 0

    def next(self) -> dict[str, np.ndarray]:
        self.step += 1
        return self.data.batch(self.step - 1, self.rows)

    def get_state(self) -> dict[str, Any]:
        return {"next_step": self.step}

    def set_state(self, state: dict[str, Any]) -> None:
        self.step = int(state["next_step"])

    @property
    def stats(self) -> dict[str, Any]:
        return {}


class PipelineLoader:
    """A Grain `BatchIterator` counted in steps (the checkpoint checks step and position agree)."""

    def __init__(self, iterator):
        self.iterator, self.step = iterator, 0

    def next(self) -> dict[str, np.ndarray]:
        self.step += 1
        return next(self.iterator)

    def get_state(self) -> dict[str, Any]:
        return {"next_step": self.step, "iterator": self.iterator.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        self.step = int(state["next_step"])
        self.iterator.set_state(state["iterator"])

    @property
    def stats(self) -> dict[str, Any]:
        return self.iterator.stats


def record_texts(record: dict[str, Any], prompt: str) -> tuple[str, str]:
    """(text input, text output) of a caption record ('caption') or a VQA record ('question' and
    'answer', the first answer): the caption has `prompt` before it, a question is formatted into
    it (default "Question: {} Answer:")."""
    if "caption" in record:
        return prompt, pre_caption(record["caption"])
    if "question" in record:
        return (prompt or "Question: {} Answer:").format(pre_question(record["question"])), \
            pre_caption(first_answer(record))
    raise KeyError(f"record {record.get('id')!r} has neither 'caption' nor 'question' (keys: {sorted(record)})")


def positive_key(value: Any) -> np.int32:
    """A record's positives field as the int32 the loss compares: an int as it is, anything else
    (LAVIS's COCO ids are strings, "coco_391895") by CRC-32. Two images of one batch of 224 share a
    key by chance with probability ~6e-6, so a whole fine-tuning run may see one pair or none."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return np.int32(value)
    return np.int32(zlib.crc32(str(value).encode()) & 0x7FFFFFFF)


@dataclasses.dataclass(frozen=True)
class RecordProcessor:
    """record -> the objective's arrays, exactly `spec`'s (picklable for Grain workers; the
    tokenizer loads lazily)."""

    kind: str  # 'stage1', 'stage2_opt', 'stage2_t5' or 'lm_opt' (text only)
    spec: BatchSpec
    image_transform: transforms.ImageTransform
    tokenizer_path: str
    text_length: int
    prompt: str = ""
    # FlanT5 prefix-LM pre-training (spec §7.2): a caption is split at a random word (1..midpoint);
    # the first part joins the encoder input after the prompt, the rest is the target.
    prefix_lm: bool = False
    # Stage 1: a record field (an int) whose equal values mark positive pairs for ITC and the hard
    # negatives, e.g. "image_id" as LAVIS's retrieval fine-tuning; "" = only the pair itself.
    positives: str = ""
    # 'lm_opt': a record's optional 'context' (text before BOS, `tokenizers.opt_context`) is padded to
    # this many tokens; 0 = records have none.
    context_length: int = 0
    # InstructBLIP (a spec with qformer_ids): the instruction (the LLM's text input) also goes to the
    # Q-Former, in its BERT vocabulary, cut from the left to this many tokens
    instruction_tokenizer_path: str = ""
    instruction_length: int = 0
    # "instructblip": each record's text input is one of the paper's templates for its task, drawn
    # per record (data/instructions.py), instead of `prompt`
    templates: str = ""
    vqa_templates: tuple[str, ...] = ()  # with templates: these replace the paper's VQA ones

    @functools.cached_property
    def instruction_tokenizer(self) -> Any:
        return tokenizers.Memoized(tokenizers.qformer_tokenizer(self.instruction_tokenizer_path,
                                                                truncation_side="left"))

    def _instruction(self, text_input: str) -> dict[str, np.ndarray]:
        if "qformer_ids" not in self.spec:
            return {}
        text = tokenizers.qformer_text(self.instruction_tokenizer, text_input, self.instruction_length)
        return {"qformer_ids": text["text_ids"], "qformer_mask": text["text_mask"]}

    @functools.cached_property
    def tokenizer(self) -> Any:
        if self.kind == "stage1":
            return tokenizers.Memoized(tokenizers.qformer_tokenizer(self.tokenizer_path))
        return tokenizers.Memoized(tokenizers.language_tokenizer(self.tokenizer_path))

    def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        return conform(self._arrays(record, rng), self.spec, f"record {record.get('id')!r}")

    def _arrays(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        if self.kind == "lm_opt":
            if "text" not in record:
                raise KeyError(f"record {record.get('id')!r} has no 'text' for language modelling (keys: "
                               f"{sorted(record)})")
            prompt = record.get("prompt", "")  # the part of the text that is no target
            out = tokenizers.opt_text(self.tokenizer, record["text"], prompt=prompt, max_length=self.text_length)
            labels = tokenizers.opt_labels(out["text_ids"][None], out["text_mask"][None], out.pop("prompt_length"))
            out["labels"] = labels[0]  # without a prompt: every text token, as a loss without labels
            if "context" in record or self.context_length:  # every row of a batch has the same keys
                if "context" not in record or not self.context_length:
                    raise KeyError(f"record {record.get('id')!r}: a 'context' needs data.context_length > 0 and "
                                   f"data.context_length {self.context_length} needs a 'context' in every record")
                out.update(tokenizers.opt_context(self.tokenizer, record["context"], self.context_length))
            return out
        image = self.image_transform(sources_lib.read_image(record["image"]), rng)
        if isinstance(record.get("caption"), (list, tuple)):  # several (web data, CapFilt's): one per epoch
            if not record["caption"]:
                raise ValueError(f"record {record.get('id')!r} has an empty caption list")
            record = {**record, "caption": record["caption"][int(rng.integers(len(record["caption"])))]}
        if self.templates:
            text_input, text_output = instruction_texts(record, rng, self.vqa_templates)
        else:
            text_input, text_output = record_texts(record, self.prompt)
        if self.prefix_lm and "caption" in record:
            prefix, text_output = split_prefix(text_output, rng)
            text_input = f"{text_input} {prefix}".strip()
        joined = f"{text_input} {text_output}".strip()
        if self.kind == "stage1":
            out = {"image": image, **tokenizers.qformer_text(self.tokenizer, joined, self.text_length)}
            if self.positives:
                out["image_id"] = positive_key(record[self.positives])
            return out
        text = tokenizers.stage2_text(self.kind, self.tokenizer, text_input, text_output, self.text_length,
                                      self.instruction_length)
        return {"image": image, **text, **self._instruction(text_input)}


def make_source(d: ml_collections.ConfigDict) -> sources_lib.Source:
    """The configured real source (`data.source` other than 'synthetic')."""
    if d.source == "json":
        return sources_lib.JsonSource([a for a in d.annotations.split(",") if a], d.image_root)
    if d.source == "arrayrecord":
        return sources_lib.ArrayRecordSource(d.path)
    if d.source == "tfds":
        return sources_lib.TfdsSource(d.tfds_name, d.split, d.path or None)
    if d.source == "webdataset":
        from blip2_jax.data.webdataset import WebDatasetSource  # pylint: disable=import-outside-toplevel

        return WebDatasetSource(d.path.split(","))
    if d.source == "parquet":
        from blip2_jax.data.parquet import ParquetSource  # pylint: disable=import-outside-toplevel

        return ParquetSource(d.path.split(","), image_root=d.image_root, **parquet_columns(d.get("columns", "")))
    if d.source == "easy_vqa":
        return sources_lib.EasyVqaSource(d.split)
    if d.source == "easy_vqa_captions":
        return easy_vqa.ListSource(easy_vqa.caption_records(d.split))
    if d.source == "easy_vqa_text":
        return easy_vqa.ListSource(easy_vqa.lm_records(d.split))
    raise ValueError(f"data.source must be one of {', '.join(sources_lib.SOURCES[1:])}; got {d.source!r}")


SOURCE_FIELDS = ("source", "annotations", "image_root", "path", "tfds_name", "split", "columns")


def parquet_columns(columns: str) -> dict[str, str]:
    """`data.columns` ("image=jpg,caption=text,id=key") as ParquetSource's column arguments."""
    pairs = [c.split("=", 1) for c in columns.split(",") if c]
    if any(len(p) != 2 or p[0] not in ("image", "caption", "id") or not p[1] for p in pairs):
        raise UserError(f"data.columns {columns!r}: expected KEY=COLUMN pairs with KEY image, caption or id")
    return {f"{key}_column": column for key, column in pairs}


# What a data.mixture entry may hold besides its source's fields.
MIXTURE_EXTRAS = ("weight", "scale", "task")


def _positive(value: Any, name: str) -> float | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return None if value is None else float(value)


def make_sources(d: ml_collections.ConfigDict) -> sources_lib.Source | Mixture:
    """The configured source, or with `data.mixture` (a list of dicts, each a source's fields as
    above plus MIXTURE_EXTRAS) a `Mixture` of them: the fields an entry leaves out come from `data`.
    Weights are all given (LAVIS's sample ratios) or all left out: then the sources are drawn in
    proportion to their size, or with `data.mixture_balance='sqrt'` its square root (InstructBLIP's),
    times an entry's `scale` (the paper's manual adjustments, e.g. A-OKVQA down, OK-VQA up). `task`
    tags every record of its source (e.g. 'vqg': a VQA set read as question generation by the
    instruction templates)."""
    if not d.mixture:
        return make_source(d)
    parts, weights, scales = [], [], []
    for i, entry in enumerate(d.mixture):
        if not isinstance(entry, (dict, ml_collections.ConfigDict)):
            raise ValueError(f"data.mixture[{i}] must be a dict of source fields, got {entry!r}")
        entry = dict(entry)
        weights.append(_positive(entry.pop("weight", None), f"data.mixture[{i}].weight"))
        scales.append(_positive(entry.pop("scale", None), f"data.mixture[{i}].scale") or 1.0)
        task = entry.pop("task", None)
        if task is not None and task not in TEMPLATES:
            raise ValueError(f"data.mixture[{i}].task must be one of {sorted(TEMPLATES)}, got {task!r}")
        unknown = sorted(set(entry) - set(SOURCE_FIELDS))
        if unknown:
            raise ValueError(f"data.mixture[{i}] has unknown keys {unknown}; a source takes {list(SOURCE_FIELDS)} "
                             f"and {', '.join(MIXTURE_EXTRAS)}")
        fields = {k: d.get(k, "") for k in SOURCE_FIELDS}
        try:
            source = make_source(ml_collections.ConfigDict({**fields, **entry}))
        except (ValueError, FileNotFoundError, ImportError) as e:
            raise type(e)(f"data.mixture[{i}]: {e}") from e
        parts.append(source if task is None else sources_lib.Tagged(source, {"task": task}))
    given = [w is not None for w in weights]
    if any(given) and not all(given):
        raise ValueError(f"data.mixture weights must be given for every source or for none, got {weights}")
    balance = d.get("mixture_balance", "size")
    if all(given) and (balance != "size" or any(s != 1.0 for s in scales)):
        raise ValueError(f"data.mixture weights set the proportions themselves: data.mixture_balance={balance!r} "
                         f"and scales {scales} would change them; give weights or balance and scales")
    return Mixture(parts, weights, balance) if all(given) else Mixture(parts, None, balance, scales)


def record_processor(d: ml_collections.ConfigDict, kind: str, spec: BatchSpec, image_size: int) -> RecordProcessor:
    """The per-record processing `config.data` (`d`) asks for."""
    return RecordProcessor(kind, spec, TRANSFORMS[d.transform](image_size), d.tokenizer, d.text_length, d.prompt,
                           d.prefix_lm, d.positives, d.context_length, d.instruction_tokenizer, d.instruction_length,
                           d.templates, tuple(d.vqa_templates))


def make_loader(config: ml_collections.ConfigDict, kind: str, image_size: int, vocab_size: int,
                spec: BatchSpec, instruction_vocab_size: int = 100) -> Loader:
    """This host's loader for `config.data`. kind: 'stage1', 'stage2_opt', 'stage2_t5' or 'lm_opt';
    images come at `image_size`; synthetic token ids are drawn below `vocab_size`; every row holds
    exactly the objective's `spec` (`data/spec.py`)."""
    d = config.data
    local = config.batch_size // jax.process_count()
    if d.source == "synthetic" and not d.mixture:  # a mixture names its own sources
        data = SyntheticData(kind=kind, global_batch_size=config.batch_size, image_size=image_size,
                             text_length=d.text_length, vocab_size=vocab_size, seed=config.seed, spec=spec,
                             instruction_vocab_size=instruction_vocab_size)
        return SyntheticLoader(data, range(jax.process_index() * local, (jax.process_index() + 1) * local))
    if kind not in RECORD_KINDS:
        raise ValueError(f"records are tokenised for {', '.join(RECORD_KINDS)}; this run is {kind}: use "
                         "data.source=synthetic")
    if "qformer_ids" in spec and not d.instruction_tokenizer:
        raise ValueError("InstructBLIP's records need data.instruction_tokenizer (the Q-Former's BERT tokenizer, a "
                         "directory or hub id) for the instruction its Q-Former reads")
    if d.transform not in TRANSFORMS:
        raise ValueError(f"data.transform must be one of {sorted(TRANSFORMS)}, got {d.transform!r}")
    if not d.tokenizer:
        raise ValueError("a real data source needs data.tokenizer (a local directory or hub id)")
    if d.prefix_lm and kind != "stage2_t5":
        raise ValueError(f"data.prefix_lm is FlanT5's prefix-LM split (stage2_t5); this run is {kind}")
    if d.positives and kind != "stage1":
        raise ValueError(f"data.positives marks ITC/ITM positives (stage1); this run is {kind}")
    if d.context_length and kind != "lm_opt":
        raise ValueError(f"data.context_length is the text-only LM's text before BOS (lm_opt); this run is {kind}")
    process = record_processor(d, kind, spec, image_size)
    sources = make_sources(d)
    if d.cache_images:
        sources = (dataclasses.replace(sources, sources=[sources_lib.CachedImages(s) for s in sources.sources])
                   if isinstance(sources, Mixture) else sources_lib.CachedImages(sources))
    iterator = make_pipeline(sources, process=process, global_batch_size=config.batch_size,
                             seed=config.seed, process_index=jax.process_index(),
                             process_count=jax.process_count(), worker_count=d.workers, read_threads=d.read_threads,
                             strict=d.strict)
    return PipelineLoader(iterator)
