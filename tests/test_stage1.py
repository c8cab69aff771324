"""Stage-1 objectives (issue "stage 1" Done-when 2): loss values against LAVIS's formulas
computed in PyTorch with the Hugging Face modules on the same weights and batch, and ITG through
the query-pass key/value prefix equal to one joint pass under the multimodal-causal mask."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blip2_jax.models import blip2
from blip2_jax.models import config as config_lib
from blip2_jax.objectives.stage1 import stage1_loss
from tests.reference import hf_models as ref
from tests.reference import stage1 as torch_stage1
from tests.stage1_setup import CONFIG, TEMP, VOCAB, stage1_params


@pytest.fixture(scope="module")
def setup():
    hf = ref.retrieval_model(seed=3)
    hf.set_attn_implementation("eager")
    cfg = config_lib.from_hf(hf.config.to_dict())
    model = blip2.Blip2Stage1(cfg)
    params = stage1_params(hf, cfg, model)
    b = 4
    px = ref.pixels(b, seed=3)
    ids, mask = ref.padded_text([6, 4, 7, 3], 7, VOCAB - 1, first=1, seed=3)
    batch = {"image": jnp.asarray(ref.nhwc(px)), "text_ids": jnp.asarray(ids), "text_mask": jnp.asarray(mask)}
    return hf, cfg, model, params, px, ids, mask, batch


NEG_IMAGE, NEG_TEXT = np.array([2, 3, 0, 1]), np.array([1, 0, 3, 2])  # fixed hard negatives


@pytest.fixture(scope="module")
def expected(setup):
    """The PyTorch reference's losses and ITG logits on the same weights and batch."""
    hf, cfg, model, params, px, ids, mask, batch = setup
    c = params["cls"]["predictions"]
    lm_head = {"dense_kernel": c["transform"]["dense"]["kernel"], "dense_bias": c["transform"]["dense"]["bias"],
               "ln_scale": c["transform"]["LayerNorm"]["scale"], "ln_bias": c["transform"]["LayerNorm"]["bias"],
               "bias": c["bias"]}
    return torch_stage1.losses(hf, {k: np.asarray(v) for k, v in lm_head.items()}, TEMP, px, ids, mask,
                               NEG_IMAGE, NEG_TEXT, CONFIG.bos_token_id, CONFIG.pad_token_id, 0.1)


def test_losses_match_pytorch_reference(setup, expected):
    hf, cfg, model, params, px, ids, mask, batch = setup
    _, metrics = jax.jit(lambda p, b: stage1_loss(p, b, jax.random.PRNGKey(0), model=model, config=CONFIG,
                                                  deterministic=True,
                                                  negatives=(jnp.asarray(NEG_IMAGE), jnp.asarray(NEG_TEXT))))(
        params, batch)
    for name in ("loss_itc", "loss_itm", "loss_itg"):
        assert abs(float(metrics[name]) - expected[name]) <= 1e-5, (name, float(metrics[name]), expected[name])
    total = expected["loss_itc"] + expected["loss_itm"] + expected["loss_itg"]
    assert abs(float(metrics["loss"]) - total) <= 3e-5


@pytest.fixture(scope="module")
def itg(setup):
    """ITG logits through the query-pass prefix and through one joint pass."""
    hf, cfg, model, params, px, ids, mask, batch = setup

    @jax.jit
    def both(params, image, text_ids, text_mask):
        v = {"params": params}
        image_embeds = model.apply(v, image, method=model.encode_image)
        _, kv = model.apply(v, image_embeds, method=model.query_pass)
        dec = text_ids.at[:, 0].set(CONFIG.bos_token_id)
        prefix = model.apply(v, dec, text_mask, kv, method=model.itg_logits)
        _, joint = model.apply(v, image_embeds, dec, text_mask, "multimodal_causal", method=model.joint_logits)
        return prefix, joint

    return [np.asarray(x) for x in both(params, batch["image"], batch["text_ids"], batch["text_mask"])]


def test_itg_prefix_pass_equals_joint_multimodal_causal_pass(setup, itg):
    prefix, joint = itg
    real = np.asarray(setup[6]).astype(bool)
    assert float(np.abs(prefix - joint)[real].max()) <= 1e-5


def test_itg_logits_match_pytorch_joint_pass(setup, itg, expected):
    mask = setup[6]
    assert float(np.abs(itg[0] - expected["itg_logits"])[mask.astype(bool)].max()) <= 1e-4


@pytest.mark.slow  # gradients with and without remat: ~90 s on a 2-core AVX2 EPYC
def test_itg_prefix_and_remat_hold_for_a_qformer_of_odd_depth(setup):
    """3 layers, cross-attention every 2nd: the query-pass prefix is split between the scanned
    group and the single-layer last group; remat of both leaves values and gradients unchanged."""
    *_, px, ids, mask, batch = setup
    hf = ref.retrieval_model(seed=5, qformer_layers=3)
    cfg = config_lib.from_hf(hf.config.to_dict())
    model = blip2.Blip2Stage1(cfg)
    params = stage1_params(hf, cfg, model)
    dec = batch["text_ids"].at[:, 0].set(CONFIG.bos_token_id)

    def logits(params, model):
        v = {"params": params}
        image_embeds = model.apply(v, batch["image"], method=model.encode_image)
        _, kv = model.apply(v, image_embeds, method=model.query_pass)
        assert kv[0].shape[0] == 3
        prefix = model.apply(v, dec, batch["text_mask"], kv, method=model.itg_logits)
        _, joint = model.apply(v, image_embeds, dec, batch["text_mask"], "multimodal_causal",
                               method=model.joint_logits)
        return prefix, joint

    real = mask.astype(bool)

    def loss(params, model):
        prefix, joint = logits(params, model)
        return jnp.sum(jnp.where(real[..., None], prefix, 0) ** 2), (prefix, joint)

    remat = blip2.Blip2Stage1(cfg.replace(remat_policy="full"))
    grad = lambda m: jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)(params, m)  # noqa: E731
    (plain, (prefix, joint)), (rematted, _) = grad(model), grad(remat)
    assert float(np.abs(np.asarray(prefix) - np.asarray(joint))[real].max()) <= 1e-5
    last = plain["qformer"]["encoder"]["remainder"]["layer_0"]  # its query keys are part of the prefix
    assert float(np.abs(last["attention"]["attention"]["key"]["kernel"]).max()) > 0
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(rematted)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_itm_over_image_rows_equals_itm_over_gathered_images(setup):
    """ITM's 3N pairs project each image's cross-attention keys/values once (`image_rows`); the
    logits are those of the pairs with the images gathered first."""
    hf, cfg, model, params, px, ids, mask, batch = setup
    rows = jnp.asarray(np.concatenate([np.arange(4), NEG_IMAGE, np.arange(4)]))
    texts = jnp.asarray(np.concatenate([np.arange(4), np.arange(4), NEG_TEXT]))
    variables = {"params": params}
    embeds = model.apply(variables, batch["image"], method=model.encode_image)
    by_rows = model.apply(variables, embeds, batch["text_ids"][texts], batch["text_mask"][texts],
                          image_rows=rows, method=model.itm)
    gathered = model.apply(variables, embeds[rows], batch["text_ids"][texts], batch["text_mask"][texts],
                           method=model.itm)
    np.testing.assert_allclose(np.asarray(by_rows), np.asarray(gathered), atol=1e-6, rtol=0)
    assert float(jnp.std(gathered)) > 1e-3  # the pairs' logits differ: the rows were read
