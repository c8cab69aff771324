"""Config checks that run right after a config is parsed, before a mesh, a model or a compile.

A wrong value found here costs a second and one line naming the field, the value and what is
expected; found later it was an IndexError, a ZeroDivisionError or a reshape error after minutes of
compiling, or it was silently accepted (a negative learning rate, 100 devices on one). Every check
raises `UserError`. `check_train_config` serves `blip2-jax train` (and `loop.train`) and, without the
device checks, `blip2-jax plan`; `check_eval_config` serves `blip2-jax eval`.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import re
from typing import Any

import jax.numpy as jnp
import ml_collections

from blip2_jax.data.instructions import TEMPLATE_SETS
from blip2_jax.data.sources import BALANCES, RECORD_KINDS, SOURCES
from blip2_jax.errors import UserError
from blip2_jax.generation.api import check_question_template
from blip2_jax.generation.config import GenerationConfig
from blip2_jax.models import presets
from blip2_jax.parallel import mesh as mesh_lib
from blip2_jax.train.init import check_init
from blip2_jax.train.optim import learning_rate_schedule
from blip2_jax.train.partition import PRESETS as TRAINABLE_PRESETS
from blip2_jax.train.profiling import parse_steps

STAGES = ("stage1", "stage2", "lm")
EVAL_TASKS = ("caption", "vqa", "choice", "retrieval")  # what evaluate/run.py runs
EVAL_SOURCES = ("json", "easy_vqa")


def _at_least(field: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UserError(f"config.{field} must be an integer >= {low}, got {value!r}")


def _non_negative(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise UserError(f"config.{field} must be a number >= 0, got {value!r}")


def _one_of(field: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"config.{field} must be one of {', '.join(allowed)}; got {value!r}")


def _float_dtype(field: str, value: Any) -> None:
    try:
        ok = jnp.issubdtype(jnp.dtype(value), jnp.floating)
    except TypeError:
        ok = False
    if not ok:
        raise UserError(f"config.{field} must be a float dtype name (float32, bfloat16, float16), got {value!r}")


def _heads_divide(field: str, hidden: int, heads: int) -> None:
    if heads < 1 or hidden % heads:
        raise UserError(f"config.model.{field}: hidden size {hidden} must be a multiple of the {heads} attention "
                        "heads")


def check_model(model: ml_collections.ConfigDict) -> None:
    """The model config builds (known fields, consistent widths) and its heads divide its widths."""
    try:
        cfg = presets.from_config_dict(model)
    except TypeError as e:  # an unknown field reaches a dataclass constructor
        raise UserError(f"config.model: {e}") from e
    except ValueError as e:
        raise UserError(f"config.model: {e}") from e
    _heads_divide("vision.num_attention_heads", cfg.vision.hidden_size, cfg.vision.num_attention_heads)
    _heads_divide("qformer.num_attention_heads", cfg.qformer.hidden_size, cfg.qformer.num_attention_heads)
    if cfg.vision.image_size % cfg.vision.patch_size:
        raise UserError(f"config.model.vision.image_size {cfg.vision.image_size} must be a multiple of patch_size "
                        f"{cfg.vision.patch_size}")
    if cfg.text is not None and cfg.text.model_type == "opt":
        _heads_divide("text.num_attention_heads", cfg.text.hidden_size, cfg.text.num_attention_heads)
    for field in ("dtype", "param_dtype"):
        _float_dtype(f"model.{field}", getattr(cfg, field))


def _check_trainable(spec: Any) -> None:
    if isinstance(spec, str):
        _one_of("trainable", spec, tuple(sorted(TRAINABLE_PRESETS)))
        return
    for pattern in spec:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as e:
            raise UserError(f"config.trainable: {pattern!r} is not a regular expression ({e})") from e


def _check_data(d: ml_collections.ConfigDict) -> None:
    _one_of("data.source", d.source, SOURCES)
    for i, entry in enumerate(d.mixture):
        if isinstance(entry, dict) and "source" in entry:
            _one_of(f"data.mixture[{i}].source", entry["source"], SOURCES)
    _at_least("data.text_length", d.text_length, 1)
    _at_least("data.workers", d.workers, 0)
    _at_least("data.read_threads", d.read_threads, 0)
    _at_least("data.instruction_length", d.instruction_length, 1)
    _one_of("data.mixture_balance", d.mixture_balance, BALANCES)
    if d.templates not in TEMPLATE_SETS:
        raise UserError(f"config.data.templates must be {' or '.join(map(repr, TEMPLATE_SETS))}; got {d.templates!r}")
    for i, template in enumerate(d.vqa_templates):
        try:
            check_question_template(template)
        except UserError as e:
            raise UserError(f"config.data.vqa_templates[{i}]: {e}") from e
    if d.vqa_templates and not d.templates:
        raise UserError("config.data.vqa_templates are drawn by data.templates='instructblip'; set it too")
    if d.templates and d.prompt:
        raise UserError(f"config.data.prompt={d.prompt!r} and data.templates={d.templates!r} both set the text "
                        "input: templates draw one per record instead of the prompt; give one")


def _check_records(config: ml_collections.ConfigDict) -> None:
    """A real source must be tokenisable for the run's batch (the loader is built after the weights
    are in place: too late to refuse it cheaply)."""
    d = config.data
    if d.source == "synthetic" and not d.mixture:
        return
    kind = config.stage if config.stage == "stage1" else f"{config.stage}_{config.model.text_type}"
    if kind not in RECORD_KINDS:
        raise UserError(f"config.data.source={d.source!r}: records are tokenised for {', '.join(RECORD_KINDS)}; "
                        f"this run is {kind} (use data.source=synthetic)")
    if config.stage == "stage2" and config.model.instruction_aware and not d.instruction_tokenizer:
        raise UserError("config.data.instruction_tokenizer: an InstructBLIP run's records need the Q-Former's BERT "
                        "tokenizer (a directory or hub id) for the instruction its Q-Former reads")


def _check_optim(o: ml_collections.ConfigDict) -> None:
    for field in ("lr", "min_lr", "warmup_lr", "weight_decay", "eps"):
        _non_negative(f"optim.{field}", o[field])
    _at_least("optim.warmup_steps", o.warmup_steps, 0)
    _at_least("optim.grad_accum_steps", o.grad_accum_steps, 1)
    learning_rate_schedule(o)  # its own checks: the schedule's name and the steps it needs
    if o.grad_clip_norm is not None and not o.grad_clip_norm > 0:
        raise UserError(f"config.optim.grad_clip_norm must be > 0 (or unset), got {o.grad_clip_norm!r}")
    for field in ("b1", "b2"):
        if not 0 <= o[field] < 1:
            raise UserError(f"config.optim.{field} must be in [0, 1), got {o[field]!r}")


def check_batch_divides(batch_size: int, data: int, fsdp: int, where: str) -> None:
    """The global batch is sharded over data x fsdp: each device takes an equal slice."""
    if batch_size % (data * fsdp):
        raise UserError(f"config.batch_size {batch_size} must be a multiple of the {data * fsdp} devices of {where}'s "
                        f"data x fsdp axes ({data} x {fsdp})")


def _mesh_shape(m: ml_collections.ConfigDict, available: int, prefix: str = "mesh.") -> tuple[int, int, int]:
    """(data, fsdp, tensor) the run's mesh will have on `available` devices; `prefix` is where the
    fields live (eval configs keep num_devices and fsdp at the top)."""
    _at_least(f"{prefix}fsdp", m.fsdp, 1)
    _at_least(f"{prefix}tensor", m.tensor, 1)
    if m.data != -1:
        _at_least(f"{prefix}data (or -1: the devices fsdp x tensor leave)", m.data, 1)
    if m.num_devices != -1:
        _at_least(f"{prefix}num_devices (or -1: every device)", m.num_devices, 1)
        if m.num_devices > available:
            raise UserError(f"config.{prefix}num_devices is {m.num_devices}, but only {available} are visible")
    devices = available if m.num_devices == -1 else m.num_devices
    if m.data == -1:
        if devices % (m.fsdp * m.tensor):
            raise UserError(f"config.{prefix}fsdp x tensor = {m.fsdp} x {m.tensor} must divide the {devices} "
                            "devices")
        return devices // (m.fsdp * m.tensor), m.fsdp, m.tensor
    if m.data * m.fsdp * m.tensor != devices:
        raise UserError(f"config.{prefix}data x fsdp x tensor = {m.data} x {m.fsdp} x {m.tensor} must equal the "
                        f"{devices} devices (set {prefix}data=-1 to take what fsdp x tensor leave)")
    return m.data, m.fsdp, m.tensor


def _check_log(log: ml_collections.ConfigDict, total_steps: int) -> None:
    parse_steps(log.profile_steps, total_steps)
    if log.wandb and importlib.util.find_spec("wandb") is None:
        raise UserError("config.log.wandb=True needs the wandb package: pip install wandb (or -e '.[wandb]')")


def check_train_config(config: ml_collections.ConfigDict, *, devices: int | None = None,
                       processes: int = 1) -> None:
    """Every field a train step depends on; with `devices`, the mesh and batch against them too
    (`plan` checks its own `--mesh` instead)."""
    _one_of("stage", config.stage, STAGES)
    _at_least("batch_size", config.batch_size, 1)
    _at_least("total_steps", config.total_steps, 1)
    _at_least("checkpoint.every", config.checkpoint.every, 1)
    _at_least("checkpoint.keep", config.checkpoint.keep, 1)
    _at_least("log.every", config.log.every, 1)
    _check_log(config.log, config.total_steps)
    _float_dtype("frozen_dtype", config.frozen_dtype)
    _check_trainable(config.trainable)
    check_init(config)
    _check_optim(config.optim)
    _check_data(config.data)
    check_model(config.model)
    _check_records(config)
    mesh_lib.parse_rules(config.mesh.rules)
    _non_negative("mesh.max_replicated_mib", config.mesh.max_replicated_mib)
    if devices is not None:
        data, fsdp, _ = _mesh_shape(config.mesh, devices)
        check_batch_divides(config.batch_size, data, fsdp, "the mesh")
        if config.batch_size % processes:
            raise UserError(f"config.batch_size {config.batch_size} must be a multiple of the {processes} processes "
                            "(each host loads an equal share)")


def check_eval_config(config: ml_collections.ConfigDict, *, devices: int) -> None:
    """What `blip2-jax eval` reads before it loads a checkpoint."""
    _one_of("task", config.task, EVAL_TASKS)
    if not config.checkpoint:
        raise UserError("set the checkpoint to evaluate: --checkpoint (a HF directory or hub id, a model checkpoint "
                        "or a training workdir)")
    _at_least("batch_size", config.batch_size, 1)
    _at_least("step (or -1: the latest)", config.step, -1)
    _at_least("k_test", config.k_test, 0)
    _at_least("text_length", config.text_length, 1)
    _one_of("data.source", config.data.source, EVAL_SOURCES)
    _at_least("data.limit (0: every sample)", config.data.get("limit", 0), 0)
    if config.dtype:
        _float_dtype("dtype", config.dtype)
    mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=config.fsdp, tensor=1, num_devices=config.num_devices))
    _mesh_shape(mesh, devices, prefix="")
    known = {f.name for f in dataclasses.fields(GenerationConfig)}
    unknown = sorted(set(config.generation) - known)
    if unknown:
        raise UserError(f"config.generation has unknown fields {unknown}; known: {sorted(known)}")
    generation = GenerationConfig(**config.generation.to_dict())  # its own checks raise UserError
    if generation.num_return_sequences != 1 or generation.do_sample:
        raise UserError("config.generation: evaluation scores one deterministic text per sample; got "
                        f"num_return_sequences {generation.num_return_sequences}, do_sample {generation.do_sample}")
    if config.task in ("vqa", "choice"):  # a second slot: OCR tokens (vqa) or the choices (choice)
        check_question_template(config.prompt, two_slots=True)
