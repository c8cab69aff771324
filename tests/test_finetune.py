"""Fine-tuning through the trainer's own path (config preset -> `train/layout.py` -> `train/step.py`):
the ViT's gradient follows the partition (a full backward pass under `finetune_*`, none under
`stage1`/`stage2`), one fine-tuning step moves the ViT exactly as transformers' BLIP-2 with
`torch.optim.AdamW` does, and a stage-1 fine-tune with nothing frozen trains, checkpoints,
resumes bit-exactly and exports."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from blip2_jax.checkpoint import Checkpointer
from blip2_jax.data.tokenizers import opt_labels
from blip2_jax.models import blip2, presets
from blip2_jax.models import config as config_lib
from blip2_jax.parallel import mesh as mesh_lib
from blip2_jax.train import layout as layout_lib
from blip2_jax.train import loop
from blip2_jax.train.flops import step_flops
from blip2_jax.train.partition import merge, partition
from blip2_jax.weights import hf_names
from blip2_jax.weights import model_checkpoint
from blip2_jax.weights.hf_checkpoint import params_from_state_dict
from tests.reference import hf_models as ref
from tests.test_convert import _flat, assert_stage1_run_exports_exactly
from tests.test_train import load_config

CONFIGS = {"stage1": "configs/stage1.py", "stage2": "configs/stage2_opt.py"}
LR = 1e-3


def _mesh():
    return mesh_lib.make_mesh(1, 1, 1, jax.devices()[:1])


def _layout(stage: str, trainable: str, config=None):
    config = config or load_config(CONFIGS[stage], "tiny")
    config.trainable = trainable
    return layout_lib.build_layout(config, _mesh())


def _step_flops(layout) -> float:
    batch = layout.batch_abstract()
    step = layout.step_fn({k: v.sharding for k, v in batch.items()})
    return step_flops(step, layout.state_abstract, layout.frozen_abstract, batch)


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_vit_backward_pass_only_where_the_vit_trains(stage):
    """The compiled step's matrix FLOPs: fine-tuning adds exactly the ViT's backward pass, i.e.
    weight and input gradients of every ViT matmul (2x its forward) less the input gradient of the
    patch convolution (the image is not differentiated); the pre-training preset adds none of it."""
    frozen_vit, finetune = _layout(stage, stage), _layout(stage, f"finetune_{stage}")
    model, vision = finetune.model, finetune.model_cfg.vision
    image = finetune.batch_abstract()["image"]
    params = blip2.abstract_params(finetune.model_cfg, model=model)
    vit_forward = step_flops(lambda p, x: model.apply({"params": p}, x, method=model.encode_image), params, image)
    patches = (vision.image_size // vision.patch_size) ** 2
    patch_conv = 2 * image.shape[0] * patches * vision.hidden_size * 3 * vision.patch_size ** 2
    assert vit_forward > patch_conv > 0
    assert _step_flops(finetune) - _step_flops(frozen_vit) == 2 * vit_forward - patch_conv


def _adam_first_moments(opt_state) -> dict[str, np.ndarray]:
    """Adam's mu after the first step, (1 - b1) x the gradient, by '/'-joined parameter path."""
    mu = optax.tree_utils.tree_get(opt_state, "mu")
    return {k: np.asarray(v) for k, v in _flat(mu).items()}


def _hf_opt_batch():
    """A stage-2 OPT batch as our objective reads it, and the same as transformers' inputs."""
    px = ref.pixels(3, seed=7)
    ids, mask = ref.padded_text([6, 4, 7], 7, ref.OPT["vocab_size"], avoid=(ref.IMAGE_TOKEN_INDEX,), seed=7, first=2)
    ids = np.where(mask == 1, ids, ref.OPT["pad_token_id"])
    labels = np.asarray(opt_labels(ids, mask, np.array([3, 0, 2]))).astype(np.int64)
    ours = {"image": ref.nhwc(px), "text_ids": ids.astype(np.int32), "text_mask": mask.astype(np.int32),
            "labels": labels.astype(np.int32)}

    def prefixed(x, value):  # HF places the Q image tokens in the text (spec §11.4)
        return torch.tensor(np.concatenate([np.full((3, ref.NUM_QUERY_TOKENS), value, x.dtype), x], axis=1))

    theirs = dict(pixel_values=torch.tensor(px), input_ids=prefixed(ids, ref.IMAGE_TOKEN_INDEX),
                  attention_mask=prefixed(mask, 1), labels=prefixed(labels, -100))
    return ours, theirs


def _torch_step(hf, inputs, optim) -> None:
    """One AdamW step of transformers' BLIP-2 with the LLM frozen and the rest (ViT included)
    trainable, under LAVIS's 'head' no-decay rule (1-d tensors and biases are not decayed)."""
    hf.language_model.requires_grad_(False)
    named = [(n, p) for n, p in hf.named_parameters() if p.requires_grad]
    no_decay = [p.ndim == 1 or n.endswith(".bias") for n, p in named]
    groups = [dict(params=[p for (_, p), nd in zip(named, no_decay) if not nd], weight_decay=optim.weight_decay),
              dict(params=[p for (_, p), nd in zip(named, no_decay) if nd], weight_decay=0.0)]
    opt = torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.b1, optim.b2), eps=optim.eps)
    hf(**inputs).loss.backward()
    opt.step()


@pytest.fixture(scope="module")
def finetune_stage2_step():
    """One `finetune_stage2` step of `configs/stage2_opt.py:tiny` on a tiny random transformers
    model, ours (the trainer's layout and jitted step) and transformers' (AdamW as ours)."""
    hf = ref.generation_model(ref.OPT, seed=7)  # eval mode: no dropout, as ours with the rates below
    cfg = config_lib.from_hf(hf.config.to_dict())
    config = load_config(CONFIGS["stage2"], "tiny")
    config.model = presets.to_config_dict(cfg)
    config.model.qformer.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config.model.text.dropout = 0.0
    config.optim.update(schedule="constant", lr=LR)
    layout = _layout("stage2", "finetune_stage2", config)
    before = params_from_state_dict(ref.state_dict(hf), cfg)
    trainable, frozen = jax.device_put(partition(before, layout.patterns), jax.devices()[0])
    batch, inputs = _hf_opt_batch()
    step = layout.step_fn({k: mesh_lib.batch_sharding(layout.mesh, v.ndim) for k, v in batch.items()})
    state, _ = step(layout.create_state(trainable), frozen, jax.tree.map(jnp.asarray, batch))
    after = dict(hf_names.to_hf(jax.device_get(merge(state.params, frozen))))
    _torch_step(hf, inputs, config.optim)
    return dict(before=dict(hf_names.to_hf(before)), after=after, torch=ref.state_dict(hf),
                mu=_adam_first_moments(jax.device_get(state.opt_state)),
                vit=[f"vision_model.{n}" for n, _ in hf.vision_model.named_parameters()])


def test_finetune_stage2_gives_every_vit_leaf_a_gradient(finetune_stage2_step):
    vit = {k: v for k, v in finetune_stage2_step["mu"].items() if k.startswith("vision_model/")}
    assert {k.split("/")[1] for k in vit} == {"embeddings", "encoder", "post_layernorm"}
    assert all(np.any(v != 0) for v in vit.values()), [k for k, v in vit.items() if not np.any(v)]


def test_finetune_stage2_step_updates_the_vit_as_pytorch(finetune_stage2_step):
    """Every updated ViT tensor equals torch's to 1e-6 = LR / 1000 (the largest difference seen is
    4e-7, on position-table entries whose gradient is ~1e-8, where Adam's g / (|g| + eps) is most
    sensitive), well inside the weight-decay term lr * 0.05 * |p| that a wrong no-decay rule would
    add or drop. The key slice of the fused qkv bias has a gradient of exactly 0 in exact arithmetic (softmax ignores
    a bias on every key): both frameworks give it float noise that Adam's g / (|g| + 1e-8) turns
    into a step of a few thousandths of the LR, so it is only checked to stay that small."""
    before, after, theirs, vit = (finetune_stage2_step[k] for k in ("before", "after", "torch", "vit"))
    assert sorted(vit) == sorted(k for k in after if k.startswith("vision_model."))  # all of the ViT
    for name in vit:
        ours, torchs = after[name], theirs[name]
        if name.endswith("self_attn.qkv.bias"):
            keys = np.s_[ours.shape[0] // 3: 2 * ours.shape[0] // 3]
            assert np.abs(ours[keys] - before[name][keys]).max() < 0.1 * LR, name
            assert np.abs(torchs[keys] - before[name][keys]).max() < 0.1 * LR, name
            ours, torchs = (np.delete(x, keys) for x in (ours, torchs))
            before_rest = np.delete(before[name], keys)
        else:
            before_rest = before[name]
        assert np.abs(torchs - before_rest).max() > 0.5 * LR, name  # a real Adam step, not weight decay alone
        np.testing.assert_allclose(ours, torchs, rtol=0, atol=1e-3 * LR, err_msg=name)
    for name in (k for k in after if k.startswith("language_model.")):
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def _train(config, workdir, steps: int) -> None:
    config.total_steps = steps
    loop.train(config, workdir)


@pytest.mark.slow
def test_stage1_finetune_with_nothing_frozen_trains_resumes_and_exports(tmp_path):
    """`configs/stage1.py:tiny` with `trainable=finetune_stage1`: the frozen tree is empty."""
    config = load_config(CONFIGS["stage1"], "tiny")
    config.trainable = "finetune_stage1"
    config.optim.warmup_steps = 1
    config.mesh.update(num_devices=1, data=1)
    config.checkpoint.update(every=1, async_save=False)
    config.log.tensorboard = False
    _train(config, tmp_path / "run", 3)
    assert not (tmp_path / "run" / "frozen").exists()

    ckpt = Checkpointer(tmp_path / "run", save_every=1)
    first, last = (jax.device_get(ckpt.restore_arrays(step)) for step in (1, 3))
    ckpt.close()
    mu = _adam_first_moments(first["opt_state"])
    vit = {k: v for k, v in mu.items() if k.startswith("vision_model/")}
    assert len(vit) > 10 and all(np.any(v != 0) for v in vit.values())  # the ViT trains

    # a run killed after step 2 leaves checkpoints 1 and 2; started again, it continues exactly
    shutil.copytree(tmp_path / "run", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "3")
    _train(config, tmp_path / "resumed", 3)
    ckpt = Checkpointer(tmp_path / "resumed", save_every=1)
    resumed = jax.device_get(ckpt.restore_arrays(3))
    ckpt.close()
    logs = [(tmp_path / d / "metrics.jsonl").read_text().splitlines() for d in ("run", "resumed")]
    assert logs[1][:2] == logs[0][:2]  # steps 1-2 kept as logged, timings too: it resumed, not restarted
    curves = [[(m["step"], m["loss"], m["grad_norm"]) for m in map(json.loads, log)] for log in logs]
    assert curves[0] == curves[1] and len(curves[0]) == 3
    for a, b in zip(jax.tree.leaves(last), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, b)

    run = model_checkpoint.CheckpointParams.open(tmp_path / "run")
    trained = _flat(run.tree())
    assert trained.keys() == _flat(last["params"]).keys()
    assert_stage1_run_exports_exactly(tmp_path / "run", trained, tmp_path)
