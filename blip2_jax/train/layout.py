"""What a run compiles, built once from its config and mesh: the objective, the trainable/frozen
split with its shardings, the optimizer, the train state's shapes and shardings, and the jitted
step. The trainer (`loop.py`) fills it with arrays; `plan.py` compiles it from shapes alone."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn
from flax import traverse_util
from jax.sharding import Mesh

from blip2_jax.data.spec import BatchSpec
from blip2_jax.errors import UserError
from blip2_jax.models import blip2, lora, presets
from blip2_jax.objectives import lm, stage1, stage2
from blip2_jax.parallel import mesh as mesh_lib
from blip2_jax.train.optim import learning_rate_schedule, make_optimizer
from blip2_jax.train.partition import cast_frozen, partition, patterns_for
from blip2_jax.train.state import TrainState
from blip2_jax.train.step import train_step


def build_objective(config: ml_collections.ConfigDict) -> tuple[blip2.Blip2Base, Any, Any]:
    """(model, model config, loss_fn(params, batch, rng)) for `config.stage`."""
    if config.stage not in blip2.STAGES:
        raise ValueError(f"config.stage must be one of {', '.join(blip2.STAGES)}, got {config.stage!r}")
    model_cfg = presets.from_config_dict(config.model)
    model = blip2.build(model_cfg, blip2.stage_architecture(config.stage, model_cfg))
    if config.stage == "stage1":
        loss_config = stage1.Stage1Config(**config.loss.to_dict())
        loss_fn = functools.partial(stage1.stage1_loss, model=model, config=loss_config)
    else:
        loss_fn = functools.partial(stage2.stage2_loss if config.stage == "stage2" else lm.lm_loss, model=model)
    return model, model_cfg, loss_fn


def data_kind(config: ml_collections.ConfigDict, model_cfg) -> str:
    """What the objective reads: 'stage1', 'stage2_opt', 'stage2_t5' or 'lm_opt' (text only)."""
    return config.stage if config.stage == "stage1" else f"{config.stage}_{model_cfg.text.model_type}"


def batch_spec(config: ml_collections.ConfigDict, model_cfg) -> BatchSpec:
    """The batch `config.stage`'s objective reads (`data/spec.py`), with the optional inputs the
    config asks for (`data.positives`, `data.context_length`)."""
    size, length = model_cfg.vision.image_size, config.data.text_length
    if config.stage == "stage1":
        return stage1.batch_spec(size, length, positives=bool(config.data.positives))
    if config.stage == "stage2":  # InstructBLIP: the Q-Former reads the instruction too
        return stage2.batch_spec(size, length, model_cfg.text.model_type,
                                 config.data.instruction_length if model_cfg.instruction_aware else 0)
    return lm.batch_spec(length, context_length=config.data.context_length)


def data_args(config: ml_collections.ConfigDict, model_cfg) -> dict[str, Any]:
    """What the data side needs to know of the model, as plain values (`data/` reads no model config):
    the batch kind, the image size, the vocabulary synthetic ids are drawn from (the Q-Former's
    without the [DEC] token ITG adds, or the LLM's), and the objective's batch spec."""
    kind = data_kind(config, model_cfg)
    vocab = model_cfg.qformer.vocab_size - 1 if kind == "stage1" else model_cfg.text.vocab_size
    return dict(kind=kind, image_size=model_cfg.vision.image_size, vocab_size=vocab,
                spec=batch_spec(config, model_cfg), instruction_vocab_size=model_cfg.qformer.vocab_size - 1)


def _with_sharding(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings)


def state_shardings_like(state: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for the train state: every leaf that mirrors a parameter (the parameters, Adam's
    mu and nu, any accumulator) is sharded like that parameter; the rest (step, counts, RNG key)
    is replicated. Left to XLA, the optimizer state came out replicated on every device."""
    by_path = {tuple(path): (tuple(leaf.shape), sh) for (path, leaf), sh in
               zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(param_shardings))}

    def pick(path, leaf):
        for start in range(len(path)):  # the parameter's own path is a suffix of the leaf's
            shape, sharding = by_path.get(tuple(path[start:]), (None, None))
            if sharding is not None and shape == tuple(leaf.shape):
                return sharding
        return mesh_lib.replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, state)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Shapes and shardings of everything a train step touches (no arrays)."""

    config: ml_collections.ConfigDict
    mesh: Mesh
    model: blip2.Blip2Base
    model_cfg: Any
    loss_fn: Callable
    patterns: Any
    trainable_shardings: Any
    frozen_shardings: Any
    frozen_abstract: Any  # in the run's frozen dtype, with shardings
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    state_shardings: Any
    state_abstract: Any  # with shardings
    init_key: jax.Array
    replicated: tuple[mesh_lib.Replicated, ...]  # parameters the mesh does not divide as config.mesh.rules mean

    def create_state(self, trainable: Any) -> TrainState:
        return TrainState.create(trainable, self.tx, self.init_key)

    def batch_abstract(self) -> dict[str, jax.ShapeDtypeStruct]:
        """The global batch the objective reads (its spec), sharded over the mesh's batch axes: what
        every loader delivers, so the step compiles before any batch exists."""
        return {k: jax.ShapeDtypeStruct((self.config.batch_size, *f.shape), f.dtype,
                                        sharding=mesh_lib.batch_sharding(self.mesh, 1 + len(f.shape)))
                for k, f in batch_spec(self.config, self.model_cfg).items()}

    def step_fn(self, batch_shardings: dict[str, Any]) -> Callable:
        """The jitted train step: state donated, explicit in/out shardings."""
        step = functools.partial(train_step, loss_fn=self.loss_fn, tx=self.tx, schedule=self.schedule)
        return jax.jit(step, in_shardings=(self.state_shardings, self.frozen_shardings, batch_shardings),
                       out_shardings=(self.state_shardings, mesh_lib.replicated(self.mesh)), donate_argnums=(0,))


def build_layout(config: ml_collections.ConfigDict, mesh: Mesh) -> Layout:
    """The run's layout on `mesh`; refused (UserError) when config.mesh.rules cannot be met past the
    config's limit, before any weight exists."""
    model, model_cfg, loss_fn = build_objective(config)
    patterns = patterns_for(config.trainable) + (lora.TRAINABLE_PATTERNS if model_cfg.lora.enabled else ())
    boxed = blip2.abstract_params(model_cfg, unbox=False, model=model)
    rules = mesh_lib.parse_rules(config.mesh.rules)
    replicated = mesh_lib.replicated_report(boxed, mesh, rules)
    mesh_lib.check_replicated(replicated, config.mesh.max_replicated_mib)
    trainable_sh, frozen_sh = partition(mesh_lib.logical_shardings(boxed, mesh, rules), patterns)
    trainable_abstract, frozen_abstract = partition(nn.unbox(boxed), patterns)
    int8 = [p for p, v in traverse_util.flatten_dict(trainable_abstract, sep="/").items() if v.dtype == jnp.int8]
    if int8:
        raise UserError(f"config.model.int8 quantizes {len(int8)} kernels config.trainable trains (e.g. {int8[0]}): "
                        "an int8 kernel is frozen; narrow config.model.int8 or adapt it with config.model.lora")
    tx = make_optimizer(config.optim, trainable_abstract)
    key = jax.random.PRNGKey(config.seed + 1)

    def create_state(trainable):
        return TrainState.create(trainable, tx, key)

    state_abstract = jax.eval_shape(create_state, trainable_abstract)
    state_shardings = state_shardings_like(state_abstract, trainable_abstract, trainable_sh, mesh)
    return Layout(config=config, mesh=mesh, model=model, model_cfg=model_cfg, loss_fn=loss_fn, patterns=patterns,
                  trainable_shardings=trainable_sh, frozen_shardings=frozen_sh,
                  frozen_abstract=cast_frozen(_with_sharding(frozen_abstract, frozen_sh),
                                              jnp.dtype(config.frozen_dtype)),
                  tx=tx, schedule=learning_rate_schedule(config.optim), state_shardings=state_shardings,
                  state_abstract=_with_sharding(state_abstract, state_shardings),
                  init_key=key, replicated=tuple(replicated))
