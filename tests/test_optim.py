"""The optimizer: schedules against hand-computed LAVIS/paper values, AdamW steps against
`torch.optim.AdamW` with LAVIS's parameter groups, clipping, accumulation, layer-wise LR decay, and
optimizer state only for the trainable tree."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import traverse_util

from blip2_jax.train import optim

QFORMER_LAYER = "qformer/encoder/layers/layer_0/output"
# A trainable tree with one leaf of each kind, named as the model names them; blocks are stacked
# (leading layer axis), so a stacked LayerNorm scale is 2-d but one layer's is 1-d.
SHAPES = {
    "language_projection/kernel": (4, 3),
    "language_projection/bias": (3,),
    "qformer/layernorm/scale": (4,),
    "vision_model/post_layernorm/scale": (4,),
    "vision_model/encoder/layers/layer_norm1/scale": (3, 4),
    f"{QFORMER_LAYER}/LayerNorm/scale": (2, 4),
    f"{QFORMER_LAYER}/dense/kernel": (2, 4, 4),
    "language_model/encoder/relative_attention_bias/embedding": (8, 2),
    "query_tokens": (1, 2, 4),
    "temp": (),
}
DECAYED = {
    "head": {"language_projection/kernel", f"{QFORMER_LAYER}/dense/kernel", "query_tokens", "temp",
             "language_model/encoder/relative_attention_bias/embedding"},
    "paper": {"language_projection/kernel", f"{QFORMER_LAYER}/dense/kernel", "query_tokens"},
}


def config(**overrides):
    cfg = optim.default_config()
    cfg.update(dict(schedule="cosine", lr=1e-2, warmup_lr=1e-3, min_lr=1e-4, warmup_steps=2, total_steps=6,
                    weight_decay=0.5))
    cfg.update(overrides)
    return cfg


def tree(flat):
    return traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(v) for k, v in flat.items()})


def flat(t):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(t).items()}


def random_flat(shapes, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}


def run_optax(cfg, params, grads_seq):
    """The parameters after each step."""
    tx = optim.make_optimizer(cfg, tree(params))
    p = tree(params)
    state = tx.init(p)
    update = jax.jit(tx.update)
    trajectory = []
    for g in grads_seq:
        updates, state = update(tree(g), state, p)
        p = optax.apply_updates(p, updates)
        trajectory.append(flat(p))
    return trajectory


def run_torch(params, grads_seq, lrs, decayed, weight_decay, betas=(0.9, 0.999), clip=None):
    """LAVIS: one AdamW param group per leaf (weight_decay 0 for no-decay leaves), lr set per step;
    the parameters after each step."""
    tp = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
    opt = torch.optim.AdamW([{"params": [t], "weight_decay": weight_decay if k in decayed else 0.0}
                             for k, t in tp.items()], lr=lrs[0], betas=betas, eps=1e-8)
    trajectory = []
    for g, lr in zip(grads_seq, lrs):
        for k, t in tp.items():
            t.grad = torch.tensor(g[k], dtype=torch.float64)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(list(tp.values()), clip)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        trajectory.append({k: t.detach().numpy().copy() for k, t in tp.items()})
    return trajectory


def assert_trees_close(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=atol, rtol=0, err_msg=k)


# --- schedules --------------------------------------------------------------------------------

def test_cosine_schedule_is_the_papers_per_step_warmup_and_cosine():
    cfg = optim.default_config()
    cfg.update(dict(schedule="cosine", warmup_steps=2000, total_steps=250_000))
    s = optim.learning_rate_schedule(cfg)
    expected = {0: 1e-6, 1000: 1e-6 + 99e-6 / 2, 2000: 1e-4, 126_000: 5.5e-5,
                2000 + 248_000 // 4: 1e-5 + 9e-5 * 0.5 * (1 + math.cos(math.pi / 4)), 250_000: 1e-5, 300_000: 1e-5}
    for step, lr in expected.items():
        np.testing.assert_allclose(float(s(step)), lr, rtol=1e-5, err_msg=str(step))


def test_lavis_epoch_schedule():
    cfg = optim.default_config()  # LAVIS stage 1: 1e-4 / 1e-5 / 1e-6, max_epoch 10
    cfg.update(dict(warmup_steps=100, steps_per_epoch=1000))
    s = jax.jit(optim.learning_rate_schedule(cfg))
    epoch1 = 1e-5 + 9e-5 * 0.5 * (1 + math.cos(math.pi / 10))
    expected = {0: 1e-6, 50: 1e-6 + 99e-6 / 2, 100: 1e-4, 999: 1e-4,  # min(lr, .) after the warmup
                1000: epoch1, 1500: epoch1, 1999: epoch1, 5000: 5.5e-5, 5999: 5.5e-5, 10_000: 1e-5}
    for step, lr in expected.items():
        np.testing.assert_allclose(float(s(jnp.int32(step))), lr, rtol=1e-5, err_msg=str(step))


def test_lavis_epoch_warmup_longer_than_an_epoch_never_peaks():
    cfg = optim.default_config()  # warmup_steps 5000
    cfg.steps_per_epoch = 1000
    s = optim.learning_rate_schedule(cfg)
    np.testing.assert_allclose(float(s(999)), 1e-6 + 99e-6 * 999 / 5000, rtol=1e-5)
    np.testing.assert_allclose(float(s(1000)), 1e-5 + 9e-5 * 0.5 * (1 + math.cos(math.pi / 10)), rtol=1e-5)


def test_constant_schedule_and_config_errors():
    assert float(optim.learning_rate_schedule(config(schedule="constant"))(12345)) == pytest.approx(1e-2)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        optim.learning_rate_schedule(optim.default_config())
    with pytest.raises(ValueError, match="total_steps"):
        optim.learning_rate_schedule(config(total_steps=None))
    with pytest.raises(ValueError, match="no_decay"):
        optim.make_optimizer(config(no_decay="all"), tree(random_flat(SHAPES, 0)))


# --- AdamW against torch ----------------------------------------------------------------------

@pytest.mark.parametrize("rule", ["head", "paper"])
def test_weight_decay_mask(rule):
    mask = flat(optim.weight_decay_mask(tree(random_flat(SHAPES, 0)), rule))
    assert {k for k, v in mask.items() if v} == DECAYED[rule]


@pytest.mark.parametrize("rule", ["head", "paper"])
def test_adamw_matches_torch(rule):
    cfg = config(no_decay=rule)
    params = random_flat(SHAPES, 0)
    grads = [random_flat(SHAPES, 1 + i) for i in range(4)]
    lrs = [float(optim.learning_rate_schedule(cfg)(i)) for i in range(4)]
    expected = run_torch(params, grads, lrs, DECAYED[rule], weight_decay=0.5)
    for got, want in zip(run_optax(cfg, params, grads), expected, strict=True):
        assert_trees_close(got, want)


def test_gradient_clipping_matches_torch():
    cfg = config(grad_clip_norm=1.0)
    params = random_flat(SHAPES, 0)
    grads = [random_flat(SHAPES, 1 + i, scale) for i, scale in enumerate([10.0, 0.05, 3.0])]  # 2nd not clipped
    lrs = [float(optim.learning_rate_schedule(cfg)(i)) for i in range(3)]
    expected = run_torch(params, grads, lrs, DECAYED["head"], weight_decay=0.5, clip=1.0)
    assert_trees_close(run_optax(cfg, params, grads)[-1], expected[-1])
    unclipped = run_torch(params, grads, lrs, DECAYED["head"], weight_decay=0.5)
    assert max(np.abs(expected[-1][k] - unclipped[-1][k]).max() for k in SHAPES) > 1e-3  # clipping acted


def test_gradient_accumulation_is_one_step_on_the_mean_gradient():
    params = random_flat(SHAPES, 0)
    grads = [random_flat(SHAPES, 1 + i) for i in range(4)]
    means = [{k: (a[k] + b[k]) / 2 for k in SHAPES} for a, b in (grads[:2], grads[2:])]
    accumulated = run_optax(config(grad_accum_steps=2), params, grads)
    assert_trees_close(accumulated[0], params)  # no step before the 2nd micro-batch
    for got, want in zip(accumulated[1::2], run_optax(config(), params, means), strict=True):
        assert_trees_close(got, want)


# --- layer-wise LR decay ----------------------------------------------------------------------

def test_layer_decay_scales_each_vit_block_slice():
    grad = random_flat({"g": (2, 2)}, 0)["g"]
    vit = "vision_model/encoder/layers/mlp/fc1/kernel"
    stem = "vision_model/embeddings/patch_embedding/kernel"
    ref = "language_projection/kernel"  # outside the ViT: scale 1
    grads = tree({vit: np.stack([grad] * 3), stem: grad, ref: grad})
    # Without weight decay every step's update is the reference's times the LR scale; with it (scaled
    # too), the first step's, where the parameters are still equal.
    for weight_decay, steps in ((0.0, 3), (0.5, 1)):
        params = tree({vit: np.ones((3, 2, 2)), stem: np.ones((2, 2)), ref: np.ones((2, 2))})
        tx = optim.make_optimizer(config(layer_decay=0.5, weight_decay=weight_decay), params)
        state, p, update = tx.init(params), params, jax.jit(tx.update)
        for _ in range(steps):
            updates, state = update(grads, state, p)
            p = optax.apply_updates(p, updates)
            u = flat(updates)
            for i, power in enumerate([3, 2, 1]):  # decay^(num_layers + 1 - layer_id), layer_id = i + 1
                np.testing.assert_allclose(u[vit][i], 0.5 ** power * u[ref], rtol=1e-6)
            np.testing.assert_allclose(u[stem], 0.5 ** 4 * u[ref], rtol=1e-6)  # the stem: layer_id 0
    scales = flat(optim.layer_decay_scales(tree({**flat(params), "vision_model/post_layernorm/scale": grad[0]}), 0.5))
    assert scales["vision_model/post_layernorm/scale"] == 1.0  # ln_vision is outside LAVIS's ViT
    with pytest.raises(ValueError, match="ViT blocks"):  # the stem's scale needs the depth
        optim.layer_decay_scales(tree({stem: grad}), 0.5)


# --- state ------------------------------------------------------------------------------------

def test_state_has_leaves_only_for_the_trainable_tree():
    trainable = random_flat(SHAPES, 0)
    frozen = {"vision_model/encoder/layers/mlp/fc1/kernel", "language_model/decoder/embed_tokens/embedding"}
    cfg = config(grad_clip_norm=1.0, grad_accum_steps=2, layer_decay=0.9)
    state = optim.make_optimizer(cfg, tree(trainable)).init(tree(trainable))
    per_param = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        names = "/".join(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
        if names:
            assert names in trainable and np.shape(leaf) == trainable[names].shape, names
            per_param[names] = per_param.get(names, 0) + 1
        else:
            assert np.ndim(leaf) == 0  # step counters
    assert per_param == {k: 3 for k in trainable}  # Adam's mu and nu, accumulated gradients
    assert not frozen & per_param.keys()
