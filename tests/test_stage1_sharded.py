"""Stage 1 over the global batch (issue "stage 1" Done-when 3): with the batch sharded over 8
simulated CPU devices the losses and gradients equal the single-device ones, and hard negatives
come from the whole global batch and never from a positive."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from blip2_jax.models import blip2
from blip2_jax.models import config as config_lib
from blip2_jax.objectives.stage1 import hard_negative_indices, positives, stage1_loss
from tests.reference import hf_models as ref
from tests.stage1_setup import CONFIG, VOCAB, stage1_params

pytestmark = pytest.mark.slow  # two compiles of the full stage-1 gradient (~2 min on 2 cores)
N = 8


@pytest.fixture(scope="module")
def results():
    assert len(jax.devices()) >= 8, "tests/conftest.py sets 8 simulated CPU devices"
    hf = ref.retrieval_model(seed=5)
    cfg = config_lib.from_hf(hf.config.to_dict())
    model = blip2.Blip2Stage1(cfg)
    params = jax.tree.map(jnp.asarray, stage1_params(hf, cfg, model, seed=5))
    ids, mask = ref.padded_text([7, 3, 5, 6, 2, 7, 4, 5], 7, VOCAB - 1, first=1, seed=5)
    batch = {"image": jnp.asarray(ref.nhwc(ref.pixels(N, seed=5))), "text_ids": jnp.asarray(ids),
             "text_mask": jnp.asarray(mask), "image_id": jnp.array([0, 0, 1, 2, 2, 3, 4, 5])}

    def loss_and_grads(params, batch, rng):  # dropout on: its masks must not depend on the sharding
        fn = lambda p: stage1_loss(p, batch, rng, model=model, config=CONFIG, deterministic=False)  # noqa: E731
        return jax.value_and_grad(fn, has_aux=True)(params)

    rngs = [jax.random.PRNGKey(0), jax.random.PRNGKey(1)]
    single = jax.jit(loss_and_grads)
    mesh = Mesh(np.array(jax.devices()[:N]), ("data",))
    replicated, by_row = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    sharded = jax.jit(loss_and_grads, in_shardings=(replicated, by_row, replicated),
                      out_shardings=replicated)
    batch_sharded = jax.device_put(batch, by_row)
    assert len(batch_sharded["image"].sharding.device_set) == N
    return ([single(params, batch, r) for r in rngs],
            [sharded(jax.device_put(params, replicated), batch_sharded, r) for r in rngs])


def test_sharded_losses_equal_single_device(results):
    single, sharded = results
    for ((loss_a, metrics_a), _), ((loss_b, metrics_b), _) in zip(single, sharded):
        for name in ("loss", "loss_itc", "loss_itm", "loss_itg"):
            assert abs(float(metrics_a[name]) - float(metrics_b[name])) <= 1e-6, name


def test_sharded_gradients_equal_single_device(results):
    """Element-wise |a - b| <= 1e-6 + 1e-6 |a| (float32 sums over the batch are reduced in another
    order across shards; the largest difference seen is ~1e-6 on the query tokens), except the
    temperature's: one scalar that sums every image-text pair's ITC term in both directions, so all
    of the batch's rounding lands on it (2.3e-6 relative on an AVX-512 EPYC, jax 0.10.2); it gets
    1e-5 relative, still far below what a missing cross-device gather would change."""
    single, sharded = results
    for (_, grads_a), (_, grads_b) in zip(single, sharded):
        for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(grads_a)[0], jax.tree.leaves(grads_b)):
            name = jax.tree_util.keystr(path)
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5 if name == "['temp']" else 1e-6,
                                       atol=1e-6, err_msg=name)
        assert float(jnp.abs(grads_a["temp"])) > 0 and float(jnp.abs(grads_a["query_tokens"]).max()) > 0
        assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads_a["vision_model"]))


def test_dropout_rng_changes_the_loss(results):
    single, _ = results
    assert float(single[0][0][0]) != float(single[1][0][0])


@pytest.mark.parametrize("weights", ["head", "paper"])
def test_hard_negatives_cover_the_global_batch_and_never_a_positive(weights):
    image_ids = jnp.array([0, 0, 1, 2, 2, 2, 3, 4])  # repeated images: several positives per row
    positive = np.asarray(positives(N, image_ids))
    sims = jax.random.normal(jax.random.PRNGKey(1), (N, N)) * 0.5  # every column has a fair chance
    keys = jax.random.split(jax.random.PRNGKey(2), 400)
    neg_image, neg_text = jax.jit(jax.vmap(lambda k: hard_negative_indices(k, sims, positive, weights)))(keys)
    neg_image, neg_text = np.asarray(neg_image), np.asarray(neg_text)  # (seeds, N)
    rows = np.arange(N)
    assert not positive.T[rows, neg_image].any(), "a text drew one of its positive images"
    assert not positive[rows, neg_text].any(), "an image drew one of its positive texts"
    for row in range(N):  # every non-positive column is drawn for some seed: the pool is the whole batch
        assert set(neg_image[:, row]) == set(np.flatnonzero(~positive.T[row]))
        assert set(neg_text[:, row]) == set(np.flatnonzero(~positive[row]))


def test_hard_negatives_follow_the_itc_softmax():
    """Without image ids, negatives are drawn in proportion to softmax(ITC logits) off the diagonal."""
    sims = jnp.array([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    keys = jax.random.split(jax.random.PRNGKey(3), 20000)
    _, neg_text = jax.jit(jax.vmap(lambda k: hard_negative_indices(k, sims, positives(3, None), "head")))(keys)
    freq = np.bincount(np.asarray(neg_text)[:, 0], minlength=3) / keys.shape[0]
    expected = np.exp([2.0, 0.0]) / np.exp([2.0, 0.0]).sum()  # image 0 over texts 1, 2 (logits 2, 0)
    np.testing.assert_allclose(freq[1:], expected, atol=0.01)
    assert freq[0] == 0.0
