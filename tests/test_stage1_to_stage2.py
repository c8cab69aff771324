"""Stage 2 from a stage-1 run (spec §3.6). Done-when: loading a stage-1 checkpoint into stage 2
keeps the Q-Former's query-path outputs identical; the projection and the LLM stay as they were;
a checkpoint of another shape fails naming the tensor; and `--config.init.stage1=WORKDIR` starts
stage 2 from what the stage-1 trainer wrote."""
import dataclasses

import jax
import numpy as np
import pytest
from flax import traverse_util

from blip2_jax.checkpoint import Checkpointer
from blip2_jax.models import blip2, presets
from blip2_jax.parallel import mesh as mesh_lib
from blip2_jax.train import init as init_lib
from blip2_jax.train import layout
from blip2_jax.train.partition import merge, partition, patterns_for
from blip2_jax.train.resume import frozen_fingerprint
from blip2_jax.weights.hf_names import CheckpointMismatchError
from blip2_jax.weights.stage1_to_stage2 import is_query_path, load_stage1, stage2_from_stage1
from tests.test_train import load_config, train_tiny_stage1

STAGE1, STAGE2 = presets.get("tiny_itm"), presets.get("tiny")


def _flat(tree) -> dict:
    return traverse_util.flatten_dict(tree, sep="/")


def _random_params(cfg, model, seed: int):
    """Random values in the model's parameter shapes (cheaper than compiling `init`)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype),
                        blip2.abstract_params(cfg, model=model))


def _query_output(model, params, pixels) -> np.ndarray:
    """The query-only Q-Former pass over ln_vision(ViT(pixels)), as each model runs it."""
    def run(params, pixels):
        image_embeds = model.apply({"params": params}, pixels, method=model.encode_image)
        return model.apply({"params": params}, image_embeds, method=model.query_features)

    return np.asarray(jax.jit(run)(params, pixels))


def test_stage1_checkpoint_keeps_query_path_outputs_identical():
    stage1_model, stage2_model = blip2.Blip2Stage1(STAGE1), blip2.Blip2ForConditionalGeneration(STAGE2)
    stage1 = _random_params(STAGE1, stage1_model, seed=1)
    # Both stages run the same frozen ViT (from its own source); ln_vision must come from stage 1.
    flat = _flat(_random_params(STAGE2, stage2_model, seed=2))
    flat.update({p: v for p, v in _flat(stage1).items()
                 if p.startswith("vision_model/") and not p.startswith("vision_model/post_layernorm/")})
    stage2 = traverse_util.unflatten_dict(flat, sep="/")
    pixels = np.random.default_rng(3).standard_normal((2, STAGE2.vision.image_size, STAGE2.vision.image_size, 3))

    converted = stage2_from_stage1(stage1, stage2)

    expected = _query_output(stage1_model, stage1, pixels)
    np.testing.assert_array_equal(_query_output(stage2_model, converted, pixels), expected)
    assert not np.allclose(_query_output(stage2_model, stage2, pixels), expected, atol=1e-3)  # input untouched
    before, after, source = _flat(stage2), _flat(converted), _flat(stage1)
    assert after.keys() == before.keys()
    assert all(is_query_path(p) for p in before if p.startswith("qformer/"))  # the whole stage-2 Q-Former
    kept = [p for p in before if not is_query_path(p)]
    assert any(p.startswith("language_projection/") for p in kept) and any(p.startswith("language_model/")
                                                                            for p in kept)
    for p in before:
        np.testing.assert_array_equal(after[p], source[p] if is_query_path(p) else before[p], err_msg=p)


def test_stage1_checkpoint_of_another_shape_names_the_tensor():
    """A stage-1 Q-Former for a 32-wide ViT does not fit a stage-2 model with a 48-wide ViT (as a
    ViT-g stage 1 does not fit a ViT-L stage 2); a missing query-path tensor is named too."""
    stage1 = _flat(blip2.abstract_params(STAGE1, model=blip2.Blip2Stage1(STAGE1)))
    wide = STAGE2.replace(vision=dataclasses.replace(STAGE2.vision, hidden_size=48),
                          qformer=dataclasses.replace(STAGE2.qformer, encoder_hidden_size=48))
    del stage1["qformer/encoder/layers/layer_1/output_query/dense/kernel"]
    with pytest.raises(CheckpointMismatchError) as err:
        stage2_from_stage1(traverse_util.unflatten_dict(stage1, sep="/"), blip2.abstract_params(wide))
    message = str(err.value)
    assert ("qformer/encoder/layers/layer_0/crossattention/attention/key/kernel: stage-2 expects shape (1, 48, 32), "
            "stage 1 has (1, 32, 32)") in message
    assert "vision_model/post_layernorm/scale: stage-2 expects shape (48,), stage 1 has (32,)" in message
    assert ("qformer/encoder/layers/layer_1/output_query/dense/kernel: missing from the stage-1 parameters "
            "(stage 2 expects shape (1, 64, 32))") in message


def test_init_stage1_is_refused_for_stage1():
    config = load_config("configs/stage1.py", "tiny")
    config.init.stage1 = "/a/stage1/run"
    model, cfg, _ = layout.build_objective(config)
    with pytest.raises(ValueError, match="init.stage1 starts stage 2"):
        init_lib.initial_params(config, model, cfg, patterns_for(config.trainable), (None, None))


@pytest.mark.slow
def test_stage2_starts_from_the_stage1_runs_checkpoint(tmp_path):
    """Through the real trainer (slow: compiling the stage-1 step takes about a minute on CPU)."""
    config = train_tiny_stage1(tmp_path)

    ckpt = Checkpointer(tmp_path, save_every=1)
    saved = {step: ckpt.restore_arrays(step)["params"] for step in (1, 2)}
    model, cfg, _ = layout.build_objective(config)
    _, frozen = partition(blip2.abstract_params(cfg, model=model), patterns_for(config.trainable))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    frozen = ckpt.restore_frozen(jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                                              frozen), frozen_fingerprint(config))
    ckpt.close()
    for step, loaded in ((2, load_stage1(tmp_path)), (1, load_stage1(tmp_path / "checkpoints" / "1"))):
        expected = _flat(jax.device_get(merge(saved[step], frozen)))
        loaded = _flat(loaded)
        assert loaded.keys() == expected.keys()
        for p, value in expected.items():
            np.testing.assert_array_equal(loaded[p], value, err_msg=f"step {step}: {p}")
    assert not np.array_equal(saved[1]["query_tokens"], saved[2]["query_tokens"])  # the steps differ

    config = load_config("configs/stage2_opt.py", "tiny")
    config.init.stage1 = str(tmp_path)
    model, cfg, _ = layout.build_objective(config)
    patterns = patterns_for(config.trainable)
    shardings = partition(mesh_lib.logical_shardings(blip2.abstract_params(cfg, unbox=False, model=model),
                                                     mesh_lib.make_mesh(data=2, fsdp=2, tensor=2)), patterns)
    trainable, frozen = init_lib.initial_params(config, model, cfg, patterns, shardings)
    assert all(jax.tree.leaves(jax.tree.map(lambda x, s: x.sharding == s, (trainable, frozen), shardings)))
    started, stage1 = _flat(jax.device_get(merge(trainable, frozen))), _flat(saved[2])
    query = [p for p in started if is_query_path(p)]
    assert "query_tokens" in query and "vision_model/post_layernorm/scale" in query
    for p in query:
        np.testing.assert_array_equal(started[p], stage1[p], err_msg=p)


def test_an_instructblip_from_stage1_reads_the_instruction_as_stage1_matches_text():
    """InstructBLIP's Q-Former from a stage-1 run (its query path and its text side: embeddings,
    text FFN, the shared LayerNorm) computes stage 1's image-text-matching pass: the query rows it
    gives for an instruction, through stage 1's ITM head, are stage 1's ITM logits for that text.
    With `text_side_only` the query path (and the LayerNorm) stay as stage 2 had them."""
    instruct_cfg = presets.get("tiny_instruct")
    stage1_model = blip2.Blip2Stage1(STAGE1)
    instruct_model = blip2.InstructBlipForConditionalGeneration(instruct_cfg)
    stage1 = _random_params(STAGE1, stage1_model, seed=4)
    flat = _flat(_random_params(instruct_cfg, instruct_model, seed=5))
    flat.update({p: v for p, v in _flat(stage1).items()
                 if p.startswith("vision_model/") and not p.startswith("vision_model/post_layernorm/")})
    before = traverse_util.unflatten_dict(flat, sep="/")
    converted = stage2_from_stage1(stage1, before)
    rng = np.random.default_rng(6)
    size = instruct_cfg.vision.image_size
    pixels = rng.standard_normal((2, size, size, 3)).astype(np.float32)
    ids = np.array([[2, 17, 40, 9, 3, 0], [2, 55, 3, 0, 0, 0]], np.int32)  # [CLS] ... [SEP], padded
    mask = (np.arange(6)[None] < np.array([[5], [3]])).astype(np.int32)

    def rows(params):
        embeds = instruct_model.apply({"params": params}, pixels, method=instruct_model.encode_image)
        return instruct_model.apply({"params": params}, embeds, ids, mask, method=instruct_model.instruction_features)

    def stage1_itm(params):
        embeds = stage1_model.apply({"params": params}, pixels, method=stage1_model.encode_image)
        return stage1_model.apply({"params": params}, embeds, ids, mask, method=stage1_model.itm)

    head = stage1["itm_head"]

    def via_instruct(params):
        return np.mean(np.asarray(rows(params)) @ np.asarray(head["kernel"]) + np.asarray(head["bias"]), axis=1)

    want = np.asarray(stage1_itm(stage1))
    np.testing.assert_allclose(via_instruct(converted), want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(via_instruct(before), want, atol=1e-3)  # the comparison can fail

    text_only = _flat(stage2_from_stage1(stage1, before, text_side_only=True))
    source = _flat(stage1)
    assert np.array_equal(text_only["qformer/embeddings/word_embeddings/embedding"],
                          source["embeddings/word_embeddings/embedding"])
    for path in ("query_tokens", "qformer/embeddings/layernorm/scale",
                 "qformer/encoder/layers/layer_0/intermediate_query/dense/kernel"):
        assert np.array_equal(text_only[path], flat[path]), path


@pytest.mark.parametrize("instruct,blip2_preset", [("instruct_flant5xl", "flant5xl"),
                                                   ("instruct_flant5xxl", "flant5xxl"), ("demo_instruct", "demo")])
def test_an_instructblip_preset_is_tuned_from_its_blip2_preset(instruct, blip2_preset):
    """What `init.checkpoint` of a BLIP-2 stage-2 model must hold for an InstructBLIP run: the
    published BLIP-2 FlanT5 checkpoints (and the demo's stage 2) pass `check_like`'s comparison."""
    from blip2_jax.weights.hf_checkpoint import config_differences  # pylint: disable=import-outside-toplevel

    source = presets.get(blip2_preset)
    assert config_differences(init_lib.without_instructions(presets.get(instruct), source), source) == []
