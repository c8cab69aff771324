"""`weights.load`: every source placed straight into its shardings equals, bit for bit, what the
whole-tree path (`load_pretrained`, `CheckpointParams.tree`) reads and `device_put`s; the shardings
are the logical ones of the mesh; a non-finite shard is refused like a non-finite tensor."""
import dataclasses
import json

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from blip2_jax.convert import hf_export
from blip2_jax.models import blip2, presets
from blip2_jax.parallel import mesh as mesh_lib
from blip2_jax.train.init import initial_params
from blip2_jax.train.layout import build_layout
from blip2_jax.weights import load as weights
from blip2_jax.weights.hf_checkpoint import load_pretrained
from blip2_jax.weights.hf_names import CheckpointMismatchError
from blip2_jax.weights.model_checkpoint import CheckpointParams
from tests.reference import hf_models as ref
from tests.test_train import load_config, train_tiny_stage1


@pytest.fixture(scope="module")
def mesh():
    return mesh_lib.make_mesh(data=2, fsdp=2, tensor=2)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """An OPT and a T5 BLIP-2 (single file, and sharded into 20 KB files) and a retrieval model."""
    out = {}
    for name, model in (("opt", ref.generation_model(ref.OPT, seed=3)), ("t5", ref.generation_model(ref.T5, seed=4)),
                        ("retrieval", ref.retrieval_model(seed=5))):
        out[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(out[name])
    out["opt_sharded"] = tmp_path_factory.mktemp("opt_sharded")
    ref.generation_model(ref.OPT, seed=3).save_pretrained(out["opt_sharded"], max_shard_size="20KB")
    return out


def _flat(tree):
    return traverse_util.flatten_dict(tree, sep="/")


def assert_placed_equal(loaded: weights.Loaded, expected: dict, mesh):
    """Every leaf equals `expected` bit for bit, in the mesh's logical sharding."""
    boxed = blip2.abstract_params(loaded.config, unbox=False, model=blip2.build(loaded.config, loaded.architecture))
    shardings = _flat(mesh_lib.logical_shardings(boxed, mesh))
    got = _flat(loaded.params)
    assert got.keys() == expected.keys() == shardings.keys()
    sharded = 0
    for path, value in got.items():
        assert value.sharding == shardings[path], path
        assert value.dtype == expected[path].dtype, path
        np.testing.assert_array_equal(np.asarray(value), expected[path], err_msg=path)
        sharded += any(value.sharding.spec)
    assert sharded > 10  # the mesh splits many leaves, so shard reading is what is tested


@pytest.mark.parametrize("name", ["opt", "opt_sharded", "t5", "retrieval"])
def test_a_hugging_face_directory_loads_into_its_shardings(hf_dirs, mesh, name):
    loaded = weights.load(hf_dirs[name], mesh=mesh)
    config, expected = load_pretrained(hf_dirs[name])
    assert loaded.config == config and loaded.tokenizer == str(hf_dirs[name])
    assert loaded.architecture == ("Blip2ForImageTextRetrieval" if name == "retrieval" else
                                   "Blip2ForConditionalGeneration")
    assert_placed_equal(loaded, _flat(expected), mesh)


def test_a_dtype_is_the_stored_dtype(hf_dirs, mesh):
    loaded = weights.load(hf_dirs["t5"], mesh=mesh, dtype="bfloat16")
    _, expected = load_pretrained(hf_dirs["t5"], dtype="bfloat16")
    assert all(v.dtype == ml_dtypes.bfloat16 for v in _flat(expected).values())
    assert_placed_equal(loaded, _flat(expected), mesh)


def test_a_model_checkpoint_restores_into_its_shardings(hf_dirs, mesh, tmp_path):
    hf_export.from_hf(hf_dirs["opt"], tmp_path / "ckpt", dtype="bfloat16")
    loaded = weights.load(tmp_path / "ckpt", mesh=mesh)  # stored bf16, loaded in the model's float32
    stored = CheckpointParams.open(tmp_path / "ckpt")
    abstract = _flat(blip2.abstract_params(stored.config, model=blip2.build(stored.config, stored.architecture)))
    expected = {p: v.astype(abstract[p].dtype) for p, v in _flat(stored.tree()).items()}
    assert loaded.architecture == stored.architecture and loaded.config == stored.config
    assert_placed_equal(loaded, expected, mesh)


def test_a_training_workdir_restores_its_trained_step(mesh, tmp_path):
    """The trainable tree of the step's train state and the frozen towers, as one model."""
    train_tiny_stage1(tmp_path)
    loaded = weights.load(tmp_path, mesh=mesh)
    stored = CheckpointParams.open(tmp_path)
    assert loaded.architecture == "Blip2Stage1" and loaded.source.endswith("step 2")
    assert_placed_equal(loaded, _flat(stored.tree()), mesh)


def test_without_a_mesh_every_leaf_is_on_the_first_device(hf_dirs):
    loaded = weights.load(hf_dirs["retrieval"])
    assert {v.sharding for v in jax.tree.leaves(loaded.params)} == {
        jax.sharding.SingleDeviceSharding(jax.devices()[0])}
    assert len(jax.tree.leaves(loaded.params)) == len(jax.tree.leaves(nn.unbox(
        blip2.abstract_params(loaded.config, model=blip2.build(loaded.config, loaded.architecture)))))


def test_a_non_finite_shard_is_refused(hf_dirs, mesh, tmp_path):
    from safetensors.numpy import load_file, save_file  # pylint: disable=import-outside-toplevel

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((hf_dirs["opt"] / "config.json").read_text())
    tensors = load_file(hf_dirs["opt"] / "model.safetensors")
    name = "language_model.model.decoder.layers.1.fc1.weight"
    tensors[name] = tensors[name].copy()
    tensors[name][-1, -1] = np.nan  # in the last shard of a leaf the mesh splits
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match=rf"{name} holds 1 NaN or Inf values"):
        weights.load(bad, mesh=mesh)
    assert json.loads((bad / "config.json").read_text())  # nothing else was written


@pytest.fixture(scope="module")
def bigger_opt(hf_dirs):
    """The OPT model's config at two more patches a side, and what the whole-tree path makes of the
    HF directory at that size (its position resize is checked against torch in test_loading)."""
    config, _ = load_pretrained(hf_dirs["opt"])
    size = config.vision.image_size + 2 * config.vision.patch_size
    bigger = config.replace(vision=dataclasses.replace(config.vision, image_size=size))
    return bigger, _flat(load_pretrained(hf_dirs["opt"], config=bigger)[1])


@pytest.mark.parametrize("kind", ["hf", "model checkpoint"])
def test_a_larger_image_size_resizes_the_position_table(hf_dirs, bigger_opt, mesh, tmp_path, kind):
    """`like` a config at a larger image size: the ViT position table resized, every other leaf read
    by shard, all as the whole-tree path; any other difference is refused before a weight is read."""
    bigger, expected = bigger_opt
    src = hf_dirs["opt"] if kind == "hf" else hf_export.from_hf(hf_dirs["opt"], tmp_path / "ckpt").source
    loaded = weights.load(src, mesh=mesh, like=bigger)
    assert loaded.config == bigger
    assert_placed_equal(loaded, expected, mesh)
    with pytest.raises(CheckpointMismatchError, match="does not match the requested config.*\n.*num_query_tokens"):
        weights.load(src, mesh=mesh, like=bigger.replace(num_query_tokens=bigger.num_query_tokens + 1))


def test_init_hf_starts_a_larger_fine_tuning_run_in_its_shardings(hf_dirs, bigger_opt, mesh):
    """The trainer's `init.hf` (train/init.py) on the layout of a stage-2 run at the larger size:
    the whole-tree path's parameters, in the layout's shardings, the frozen towers in frozen_dtype."""
    bigger, expected = bigger_opt
    config = load_config("configs/stage2_opt.py", "tiny")
    config.model = presets.to_config_dict(bigger)
    config.init.hf = str(hf_dirs["opt"])
    config.frozen_dtype = "bfloat16"
    layout = build_layout(config, mesh)
    trainable, frozen = initial_params(config, layout.model, layout.model_cfg, layout.patterns,
                                       (layout.trainable_shardings, layout.frozen_shardings))
    got = {**_flat(trainable), **_flat(frozen)}
    shardings = {**_flat(layout.trainable_shardings), **_flat(layout.frozen_shardings)}
    assert got.keys() == expected.keys()
    assert set(_flat(frozen)) and set(_flat(trainable))
    for path, value in got.items():
        assert value.sharding == shardings[path], path
        want = expected[path].astype(ml_dtypes.bfloat16) if path in _flat(frozen) else expected[path]
        np.testing.assert_array_equal(np.asarray(value), want, err_msg=path)
