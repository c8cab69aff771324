"""int8 weight-only frozen towers (`models/quantization.py`): the quantizer against its defining
bound, logits against the bf16 model (tiny, and an OPT-2.7B-width layer), the frozen bytes `plan`
counts at FlanT5-XXL size, and a tiny stage-2 run's loss curve against the same run in bf16."""
from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util
from PIL import Image
from safetensors.numpy import load_file

from blip2_jax.convert import hf_export
from blip2_jax.errors import UserError
from blip2_jax.models import blip2, presets, quantization
from blip2_jax.models.config import OPTConfig
from blip2_jax.parallel import mesh as mesh_lib
from blip2_jax.train import loop
from blip2_jax.train.layout import build_layout
from blip2_jax.train.plan import per_device_bytes
from blip2_jax.weights import load as weights
from blip2_jax.weights.model_checkpoint import CheckpointParams
from tests.reference import hf_models as ref
from tests.reference.tokenizers import tiny_opt_tokenizer
from tests.test_lora import init_params, source_checkpoint
from tests.test_train import load_config

TOWERS = quantization.TOWERS


def test_a_quantized_kernel_is_within_half_a_step_of_the_weight():
    w = np.random.default_rng(0).standard_normal((3, 64, 48)).astype(np.float32) * 0.02
    w[1, :, 5] = 0.0  # a dead output channel: scale 0, no division by it
    q, scale = quantization.quantize_kernel(jnp.asarray(w))
    assert q.dtype == jnp.int8 and scale.shape == (3, 48) and int(jnp.abs(q).max()) == 127
    error = np.abs(quantization.dequantize_kernel(np.asarray(q), np.asarray(scale)) - w)
    assert np.all(error <= np.asarray(scale)[:, None, :] / 2 + 1e-9)
    assert np.all(np.asarray(q)[1, :, 5] == 0)


def _logits(config, params, pixels, ids) -> np.ndarray:
    out = jax.jit(blip2.build(config).apply)({"params": params}, pixels, ids, jnp.ones_like(ids))
    return np.asarray(out.logits, np.float32)


# (model, int8 vs bf16: RMS of the logit difference / RMS of the logits, its largest entry / RMS)
# measured 0.0066/0.034 (tiny) and 0.021/0.088 (full width) on random N(0, 0.02) weights
@pytest.mark.parametrize("text,rms_tol,max_tol", [
    (None, 0.015, 0.06),
    (OPTConfig(vocab_size=512, hidden_size=2560, ffn_dim=10240, num_hidden_layers=1, num_attention_heads=32,
               max_position_embeddings=64), 0.04, 0.15)], ids=["tiny", "opt2.7b_width_layer"])
def test_int8_towers_compute_the_bf16_models_logits_within_the_stated_tolerance(text, rms_tol, max_tol):
    """The bf16 model (bf16 weights and compute) and the int8 one (int8 ViT and LLM kernels, bf16
    compute) against fp32: int8 adds per-channel rounding of the weights, so its logits may differ
    from bf16's by the stated fraction of the logits' RMS."""
    config = presets.get("tiny") if text is None else presets.get("tiny").replace(text=text)
    params = init_params(config, 0) if text is None else nn.unbox(  # jit compiles the full width slower than it runs
        blip2.init(config, jax.random.PRNGKey(0), blip2.build(config))["params"])
    rng = np.random.default_rng(0)
    pixels = jnp.asarray(rng.standard_normal((2, 32, 32, 3)), jnp.float32)
    ids = jnp.asarray(np.concatenate([np.full((2, 8), 127), rng.integers(3, 120, (2, 8))], 1))
    bf16 = config.replace(dtype="bfloat16")
    half = _logits(bf16, jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params), pixels, ids)
    quantized = quantization.quantize(params, TOWERS)
    flat = traverse_util.flatten_dict(quantized, sep="/")
    assert flat["language_model/model/decoder/layers/fc1/kernel"].dtype == jnp.int8
    assert flat["language_model/model/decoder/layers/fc1/kernel_scale"].dtype == jnp.float32
    int8 = _logits(bf16.replace(int8=TOWERS), quantized, pixels, ids)
    rms = np.sqrt(np.mean(_logits(config, params, pixels, ids) ** 2))
    assert np.sqrt(np.mean((int8 - half) ** 2)) / rms <= rms_tol
    assert np.abs(int8 - half).max() / rms <= max_tol
    assert np.abs(int8 - half).max() > 0  # the int8 path ran


def test_plan_counts_int8_towers_at_half_their_bf16_bytes():
    """`configs/stage2_t5.py:flant5xxl_int8` against `flant5xxl` (bf16) on shapes: the frozen bytes
    per device (what `plan` reports) halve, to within the embeddings, norms and scales left as they are."""
    mesh = mesh_lib.make_mesh(fsdp=8)
    frozen = {arg: per_device_bytes(build_layout(load_config("configs/stage2_t5.py", arg), mesh).frozen_abstract)
              for arg in ("flant5xxl", "flant5xxl_int8")}
    ratio = frozen["flant5xxl_int8"] / frozen["flant5xxl"]
    assert 0.5 <= ratio <= 0.53, ratio
    assert frozen["flant5xxl"] > 2.8 * 2**30  # 12.3 B parameters in bf16 over 8 devices


def test_training_an_int8_kernel_is_refused():
    config = load_config("configs/finetune.py", "caption_coco_opt2.7b")
    config.model.int8 = TOWERS  # the fine-tuning preset trains the ViT
    with pytest.raises(UserError, match="int8 kernel is frozen"):
        build_layout(config, mesh_lib.make_mesh(fsdp=8))


@pytest.mark.slow  # two tiny stage-2 runs: ~90 s on 2 cores
def test_a_tiny_stage2_run_with_int8_towers_follows_the_bf16_loss_curve(tmp_path, no_processor_files):
    """`configs/stage2_t5.py:tiny_int8` against `tiny` with bf16 frozen towers, both from one model
    checkpoint, same data and seed: the int8 kernels are the source's quantized at load; every
    step's loss within the stated 2.5% and their mean within 0.5% (measured: 1.14% and 0.07%; the
    towers' rounding is all that differs, and the two runs' updates drift apart with it); the frozen
    checkpoint holds int8, a resumed int8 run continues exactly, and `to_hf` writes the kernels
    dequantized."""
    source = source_checkpoint(tmp_path / "source", "tiny_t5")
    losses = {}
    for arg in ("tiny", "tiny_int8"):
        config = load_config("configs/stage2_t5.py", arg)
        config.init.checkpoint = str(tmp_path / "source")
        config.frozen_dtype, config.model.dtype = "bfloat16", "bfloat16"
        config.mesh.update(num_devices=1, data=1)
        config.checkpoint.update(every=10, async_save=False)
        config.log.tensorboard = False
        loop.train(config, tmp_path / arg)
        losses[arg] = np.array([m["loss"] for m in map(json.loads, (tmp_path / arg / "metrics.jsonl").open())])
    assert len(losses["tiny"]) == len(losses["tiny_int8"]) == 20
    np.testing.assert_allclose(losses["tiny_int8"], losses["tiny"], rtol=0.025)
    assert abs(losses["tiny_int8"].mean() / losses["tiny"].mean() - 1) <= 0.005
    assert not np.array_equal(losses["tiny_int8"], losses["tiny"])  # the int8 towers ran
    run = CheckpointParams.open(tmp_path / "tiny_int8")
    kernel = "language_model/encoder/block/layer_0/SelfAttention/q/kernel"
    leaves = run.read([kernel, kernel + "_scale"])
    q, scale = quantization.quantize_kernel(jnp.asarray(source[kernel]))
    np.testing.assert_array_equal(leaves[kernel], q)
    np.testing.assert_array_equal(leaves[kernel + "_scale"], scale)

    shutil.copytree(tmp_path / "tiny_int8", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "20")
    loop.train(config, tmp_path / "resumed")
    resumed = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").open()]
    assert [m["loss"] for m in resumed] == list(losses["tiny_int8"])

    hf_export.to_hf(run, tmp_path / "hf", tokenizer="none")
    written = load_file(tmp_path / "hf" / "model.safetensors")
    np.testing.assert_array_equal(written["language_model.encoder.block.0.layer.0.SelfAttention.q.weight"],
                                  quantization.dequantize_kernel(leaves[kernel], leaves[kernel + "_scale"])[0].T)


def test_inference_quantizes_a_float_checkpoint_at_load(tmp_path, blip2_jax):
    """`weights.load(..., int8=TOWERS)` (what `generate --int8`, `Blip2Generator.from_pretrained(...,
    int8=)` and eval's `config.int8` ask for) gives exactly the float checkpoint's kernels quantized,
    in int8; `generate --int8` captions with them."""
    directory = tmp_path / "hf"
    ref.generation_model(ref.OPT, seed=1).save_pretrained(directory)
    tiny_opt_tokenizer().save_pretrained(directory)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    expected = traverse_util.flatten_dict(quantization.quantize(weights.load(directory).params, TOWERS), sep="/")
    got = traverse_util.flatten_dict(weights.load(directory, int8=TOWERS).params, sep="/")
    assert got.keys() == expected.keys()
    for path, value in expected.items():
        assert got[path].dtype == value.dtype and np.array_equal(got[path], value), path
    assert got["language_model/model/decoder/layers/fc1/kernel"].dtype == jnp.int8
    code, out, err = blip2_jax("generate", "--checkpoint", str(directory), "--image", str(tmp_path / "a.png"),
                               "--max_new_tokens", "5", "--int8")
    assert code == 0 and out.count("\t") == 1, err
