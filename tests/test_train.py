"""The training system (issue "training" Done-when 1-3): optimizer state only for what trains,
no weight gradients for frozen towers, and the same run on 1 device and on a
data x fsdp x tensor = 2 x 2 x 2 mesh of 8 simulated devices."""
import functools
import importlib.util
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from blip2_jax.checkpoint import Checkpointer
from blip2_jax.data.loader import make_loader
from blip2_jax.models import blip2, presets
from blip2_jax.train import layout, loop
from blip2_jax.train.optim import make_optimizer
from blip2_jax.train.flops import matmul_equations, matmul_flops, step_flops
from blip2_jax.train.partition import merge, partition, patterns_for
from blip2_jax.train.state import TrainState
from blip2_jax.train.step import train_step
from blip2_jax.weights.model_checkpoint import CheckpointParams

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(file: str, arg: str):
    spec = importlib.util.spec_from_file_location(pathlib.Path(file).stem, ROOT / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def assert_resumes_exactly(config, run, resumed, last: int) -> None:
    """A copy of the finished `run` without its step-`last` checkpoint, trained again, logs the same
    steps, losses and gradient norms and ends with bit-identical parameters."""
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / str(last))
    loop.train(config, resumed)
    logs = [[(m["step"], m["loss"], m["grad_norm"]) for m in map(json.loads, (d / "metrics.jsonl").open())]
            for d in (run, resumed)]
    assert logs[0] == logs[1] and len(logs[0]) == last
    want, got = (traverse_util.flatten_dict(CheckpointParams.open(d).tree(), sep="/") for d in (run, resumed))
    assert got.keys() == want.keys() and all(np.array_equal(got[p], want[p]) for p in want)


def train_tiny_stage1(workdir, steps: int = 2):
    """A real `steps`-step tiny stage-1 run on one device, checkpointed every step; its config."""
    config = load_config("configs/stage1.py", "tiny")
    config.total_steps, config.optim.warmup_steps = steps, 1
    config.mesh.update(num_devices=1, data=1)
    config.checkpoint.update(every=1, async_save=False)
    config.log.tensorboard = False
    loop.train(config, workdir)
    return config


def _size(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _array_leaves(tree):
    return [x for x in jax.tree.leaves(tree) if np.ndim(x) > 0]


def test_optimizer_state_only_for_trainable_params_at_flant5_xxl_size():
    config = load_config("configs/stage2_t5.py", "flant5xxl")
    cfg = presets.from_config_dict(config.model)
    params = blip2.abstract_params(cfg)
    trainable, frozen = partition(params, patterns_for(config.trainable))
    opt_state = jax.eval_shape(lambda p: make_optimizer(config.optim, p).init(p), trainable)
    trainable_size, total = _size(trainable), _size(params)
    assert _size(_array_leaves(opt_state)) == 2 * trainable_size  # Adam's mu and nu, nothing else
    assert trainable_size < 0.01 * total  # ~108M of 12.2B (spec §15 Table 2)
    assert 100e6 < trainable_size < 110e6
    flat = {"/".join(k) for k in traverse_util.flatten_dict(trainable)}
    assert not any(p.startswith(("language_model/", "vision_model/encoder", "vision_model/embeddings"))
                   for p in flat)
    assert "vision_model/post_layernorm/scale" in flat and "query_tokens" in flat


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_every_parameter_is_trainable_or_frozen_exactly_once(stage):
    cfg = presets.get("tiny_itm" if stage == "stage1" else "tiny")
    model = blip2.Blip2Stage1(cfg) if stage == "stage1" else None
    params = blip2.abstract_params(cfg, model=model)
    trainable, frozen = partition(params, patterns_for(stage))
    a, b = traverse_util.flatten_dict(trainable), traverse_util.flatten_dict(frozen)
    assert not set(a) & set(b) and len(a) + len(b) == len(traverse_util.flatten_dict(params))
    assert traverse_util.flatten_dict(merge(trainable, frozen)).keys() == traverse_util.flatten_dict(params).keys()
    frozen_towers = {k[0] for k in b}
    assert frozen_towers == ({"vision_model"} if stage == "stage1" else {"vision_model", "language_model"})


def test_frozen_towers_get_no_weight_gradients():
    """The compiled step does the frozen towers' weight-gradient matmuls only when they train."""
    config = load_config("configs/stage2_opt.py", "tiny")
    model, cfg, loss_fn = layout.build_objective(config)
    params = nn.unbox(jax.jit(lambda r: blip2.init(cfg, r, model))(jax.random.PRNGKey(0))["params"])
    batch = jax.tree.map(jnp.asarray, make_loader(config, **layout.data_args(config, cfg)).next())

    def grad_flops(patterns):
        trainable, frozen = partition(params, patterns)
        fn = jax.jit(lambda t, f: jax.grad(lambda t: loss_fn(merge(t, f), batch, jax.random.PRNGKey(0))[0])(t))
        return step_flops(fn, trainable, frozen)

    stage2 = grad_flops(patterns_for("stage2"))
    everything = grad_flops((r".*",))
    lm = params["language_model"]["model"]["decoder"]["layers"]
    tokens = config.batch_size * (cfg.num_query_tokens + config.data.text_length)
    lm_weight_grads = 2 * tokens * sum(int(np.prod(lm[k]["kernel"].shape)) for k in ("fc1", "fc2"))
    assert everything - stage2 >= lm_weight_grads  # at least the LLM's FFN weight gradients are skipped
    assert stage2 > 0


def _run(tmp, config):
    loop.train(config, tmp)
    lines = [json.loads(x) for x in (tmp / "metrics.jsonl").read_text().splitlines()]
    return lines


@pytest.mark.slow
def test_one_device_and_a_2x2x2_mesh_train_the_same(tmp_path):
    losses, params = {}, {}
    for name, mesh in {"one": dict(num_devices=1, data=1), "mesh": dict(data=2, fsdp=2, tensor=2)}.items():
        config = load_config("configs/stage2_opt.py", "tiny")
        config.total_steps = 4
        config.optim.warmup_steps = 2
        config.mesh.update(mesh)
        config.checkpoint.async_save = False
        lines = _run(tmp_path / name, config)
        losses[name] = [x["loss"] for x in lines]
        ckpt = Checkpointer(tmp_path / name, save_every=1)
        params[name] = jax.device_get(ckpt.restore_arrays()["params"])
        ckpt.close()
    assert len(losses["one"]) == 4
    np.testing.assert_allclose(losses["mesh"], losses["one"], rtol=0, atol=1e-5)
    for a, b in zip(jax.tree.leaves(params["one"]), jax.tree.leaves(params["mesh"])):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)


def test_frozen_values_are_bit_identical_after_training_steps():
    config = load_config("configs/stage2_opt.py", "tiny")
    config.optim.warmup_steps = 1
    model, cfg, loss_fn = layout.build_objective(config)
    params = nn.unbox(jax.jit(lambda r: blip2.init(cfg, r, model))(jax.random.PRNGKey(0))["params"])
    trainable, frozen = partition(params, patterns_for(config.trainable))
    before_frozen, before_trainable = jax.device_get(frozen), jax.device_get(trainable)
    tx = make_optimizer(config.optim, trainable)
    state = TrainState.create(trainable, tx, jax.random.PRNGKey(1))
    step = jax.jit(functools.partial(train_step, loss_fn=loss_fn, tx=tx), donate_argnums=(0,))
    loader = make_loader(config, **layout.data_args(config, cfg))
    for _ in range(3):
        state, _ = step(state, frozen, jax.tree.map(jnp.asarray, loader.next()))
    for a, b in zip(jax.tree.leaves(before_frozen), jax.tree.leaves(jax.device_get(frozen))):
        np.testing.assert_array_equal(a, b)
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before_trainable),
                                                         jax.tree.leaves(jax.device_get(state.params)))]
    assert all(changed)  # every trainable leaf moved, so the steps really trained


def test_flop_count_sees_every_scanned_layer():
    """A scanned stack of L matmuls counts L times (XLA's cost analysis counts a loop body once)."""
    def stack(x, w):
        return jax.lax.scan(lambda h, wi: (h @ wi, None), x, w)[0]

    x, w = jnp.ones((4, 8)), jnp.ones((5, 8, 8))
    assert step_flops(stack, x, w) == 5 * 2 * 4 * 8 * 8


def test_matmul_equations_count_scans_and_the_costlier_branch():
    """Inside a 3-step scan, a cond choosing a (4,8)x(8,16) dot or a (4,8)x(8,8) one: only the
    costlier branch's dot is listed, with the count 3 and its shapes (what the benchmarks time)."""
    def stack(x, w_wide, w_square):
        def body(h, i):
            return jax.lax.cond(i > 0, lambda: (h @ w_wide)[:, :8], lambda: h @ w_square), None
        return jax.lax.scan(body, x, jnp.arange(3))[0]

    jaxpr = jax.make_jaxpr(stack)(jnp.ones((4, 8)), jnp.ones((8, 16)), jnp.ones((8, 8))).jaxpr
    found = matmul_equations(jaxpr)
    assert [(tuple(v.aval.shape for v in eqn.invars), n) for eqn, n in found] == [(((4, 8), (8, 16)), 3)]
    assert matmul_flops(jaxpr) == 3 * 2 * 4 * 8 * 16
