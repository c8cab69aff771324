"""Stage-2 objectives: the OPT and FlanT5 LM losses against `transformers`' own loss on the same
tiny perturbed models (LAVIS's concatenated visual prompt = HF's <image> tokens, spec §11.4),
LAVIS's OPT label masking, and where the gradient flows (through the LLM, into the ViT)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from blip2_jax.data.tokenizers import opt_labels
from blip2_jax.models import blip2
from blip2_jax.models import config as config_lib
from blip2_jax.objectives.stage2 import stage2_loss
from blip2_jax.weights.hf_checkpoint import params_from_state_dict
from tests.reference import hf_models as ref

Q = ref.NUM_QUERY_TOKENS
IMAGE = ref.IMAGE_TOKEN_INDEX
B = 3


def _ours(hf_model):
    cfg = config_lib.from_hf(hf_model.config.to_dict())
    return blip2.build(cfg), params_from_state_dict(ref.state_dict(hf_model), cfg)


def _prefixed(x: np.ndarray, value: int) -> np.ndarray:
    return np.concatenate([np.full((x.shape[0], Q), value, x.dtype), x], axis=1)


def _loss_fn(model, deterministic):
    return jax.jit(lambda p, b, r: stage2_loss(p, b, r, model=model, deterministic=deterministic))


def test_opt_labels_hand_computed():
    ids = jnp.array([[2, 10, 11, 12, 13, 50], [2, 20, 21, 50, 1, 1], [2, 30, 50, 1, 1, 1]])
    mask = (ids != 1).astype(jnp.int32)
    got = opt_labels(ids, mask, jnp.array([3, 0, 1]))
    expected = [[-100, -100, -100, 12, 13, 50], [2, 20, 21, 50, -100, -100], [-100, 30, 50, -100, -100, -100]]
    np.testing.assert_array_equal(np.asarray(got), expected)
    np.testing.assert_array_equal(np.asarray(opt_labels(ids, mask, 2))[:, :3],
                                  [[-100, -100, 11], [-100, -100, 21], [-100, -100, 50]])


@pytest.fixture(scope="module")
def opt():
    """HF's loss, and our (loss, metrics) and gradient from one compiled value_and_grad."""
    hf = ref.generation_model(ref.OPT, seed=5)
    model, params = _ours(hf)
    px = ref.pixels(B, seed=5)
    ids, mask = ref.padded_text([6, 4, 7], 7, ref.OPT["vocab_size"], avoid=(IMAGE,), seed=5, first=2)
    ids = np.where(mask == 1, ids, ref.OPT["pad_token_id"])
    labels = np.asarray(opt_labels(ids, mask, np.array([3, 0, 2]))).astype(np.int64)
    batch = {"image": jnp.asarray(ref.nhwc(px)), "text_ids": jnp.asarray(ids), "text_mask": jnp.asarray(mask),
             "labels": jnp.asarray(labels)}
    with torch.no_grad():
        out = hf(pixel_values=torch.tensor(px), input_ids=torch.tensor(_prefixed(ids, IMAGE)),
                 attention_mask=torch.tensor(_prefixed(mask, 1)), labels=torch.tensor(_prefixed(labels, -100)))
    grad_fn = jax.jit(jax.value_and_grad(
        lambda p, b: stage2_loss(p, b, jax.random.PRNGKey(0), model=model, deterministic=True), has_aux=True))
    (loss, metrics), grads = grad_fn(params, batch)
    return dict(model=model, params=params, batch=batch, labels=labels, expected=float(out.loss),
                loss=float(loss), metrics={k: float(v) for k, v in metrics.items()},
                grads=jax.tree_util.tree_map(np.asarray, grads))


def test_opt_loss_matches_transformers(opt):
    labels, loss = opt["labels"], opt["loss"]
    assert labels[1, 0] == 2 and (labels[0, :3] == -100).all()  # BOS kept as a target only with prompt 0
    assert abs(loss - opt["expected"]) <= 1e-5, (loss, opt["expected"])
    assert opt["metrics"] == {"loss": loss, "loss_lm": loss}


def test_gradient_reaches_qformer_through_the_llm_and_into_the_vit(opt):
    """The loss cuts nothing: the LLM passes gradients back to the Q-Former, and the ViT gets its
    own, which the train step uses only where the partition makes it trainable (test_finetune.py)."""
    grads = opt["grads"]
    for name in ("language_model", "language_projection", "qformer", "query_tokens"):
        assert any(np.any(x) for x in jax.tree_util.tree_leaves(grads[name])), name
    vision = traverse_util.flatten_dict(grads["vision_model"])
    assert len(vision) > 10 and all(np.any(v) for v in vision.values())


def test_dropout_follows_rng_when_not_deterministic(opt):
    loss_fn = _loss_fn(opt["model"], False)  # rbg keys: XLA:CPU compiles threefry dropout ~2x slower
    losses = [float(loss_fn(opt["params"], opt["batch"], jax.random.key(i, impl="rbg"))[0]) for i in (0, 1)]
    assert all(np.isfinite(losses)) and losses[0] != losses[1] and opt["loss"] not in losses


@pytest.fixture(scope="module")
def t5():
    hf = ref.generation_model(ref.T5, seed=6)
    model, params = _ours(hf)
    px = ref.pixels(B, seed=6)
    vocab, eos, pad = ref.T5["vocab_size"], ref.T5["eos_token_id"], ref.T5["pad_token_id"]
    in_ids, in_mask = ref.padded_text([4, 2, 5], 5, vocab, avoid=(IMAGE,), seed=6)
    out_ids, out_mask = ref.padded_text([3, 5, 2], 5, vocab, seed=7)
    for ids, mask in ((in_ids, in_mask), (out_ids, out_mask)):  # each row ends with </s>, pad 0
        ids[np.arange(B), mask.sum(1) - 1] = eos
        ids[mask == 0] = pad
    batch = {"image": jnp.asarray(ref.nhwc(px)), "input_ids": jnp.asarray(in_ids), "input_mask": jnp.asarray(in_mask),
             "output_ids": jnp.asarray(out_ids), "output_mask": jnp.asarray(out_mask)}
    with torch.no_grad():
        out = hf(pixel_values=torch.tensor(px), input_ids=torch.tensor(_prefixed(in_ids, IMAGE)),
                 attention_mask=torch.tensor(_prefixed(in_mask, 1)),
                 labels=torch.tensor(np.where(out_ids == pad, -100, out_ids)),
                 decoder_attention_mask=torch.tensor(out_mask))
    return model, params, batch, float(out.loss)


def test_t5_loss_matches_transformers(t5):
    model, params, batch, expected = t5
    loss, metrics = _loss_fn(model, True)(params, batch, jax.random.PRNGKey(0))
    assert abs(float(loss) - expected) <= 1e-5, (float(loss), expected)
    assert float(metrics["loss_lm"]) == float(loss)
