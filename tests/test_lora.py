"""LoRA (`models/lora.py`, `weights/peft.py`): an adapted model computes what transformers + PEFT
compute on our export (`PeftModel.from_pretrained`), a PEFT adapter imports as ours, merged and
unmerged agree, and training builds gradients and optimizer state for the adapters (and the
partition's trainables) only — checked at full OPT-2.7B size on shapes."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import linen as nn
from flax import traverse_util

from blip2_jax.convert import hf_export
from blip2_jax.errors import UserError
from blip2_jax.generation.api import Blip2Generator
from blip2_jax.generation.config import GenerationConfig
from blip2_jax.models import blip2, lora, presets, quantization
from blip2_jax.models import config as config_lib
from blip2_jax.parallel import mesh as mesh_lib
from blip2_jax.train import loop
from blip2_jax.train.layout import build_layout
from blip2_jax.weights import load as weights
from blip2_jax.weights import model_checkpoint
from blip2_jax.weights.model_checkpoint import CheckpointParams
from tests.reference import hf_models as ref
from tests.reference.tokenizers import tiny_opt_tokenizer
from tests.test_train import assert_resumes_exactly, load_config

os.environ["HF_HUB_OFFLINE"] = "1"
Q = ref.NUM_QUERY_TOKENS
TOL = 1e-4
# the LLM's query/value projections, the ViT's fused qkv, the Q-Former's query projections (self and cross)
TARGETS = {"opt": (r"language_model/.*/(q_proj|v_proj)$", r"vision_model/.*/qkv$", r"qformer/.*/query$"),
           "t5": (r"language_model/.*/(q|v)$", r"vision_model/.*/qkv$")}
TEXT = {"opt": ref.OPT, "t5": ref.T5}


def _inputs(kind: str):
    ids, mask = ref.padded_text([6, 4, 2], 6, 99, left=kind == "opt", avoid=(ref.IMAGE_TOKEN_INDEX,))
    ids = np.concatenate([np.full((3, Q), ref.IMAGE_TOKEN_INDEX), ids], 1)
    mask = np.concatenate([np.ones((3, Q), np.int64), mask], 1)
    extra = {"decoder_input_ids": np.array([[0, 7, 9, 11]] * 3)} if kind == "t5" else {}
    return ref.pixels(3, seed=1), ids, mask, extra


def _ours(model: nn.Module, params, kind: str) -> np.ndarray:
    px, ids, mask, extra = _inputs(kind)
    return np.asarray(jax.jit(model.apply)({"params": params}, ref.nhwc(px), ids, mask, **extra).logits)


def _theirs(model: torch.nn.Module, kind: str) -> np.ndarray:
    px, ids, mask, extra = _inputs(kind)
    with torch.no_grad():
        return model(pixel_values=torch.tensor(px), input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     **{k: torch.tensor(v) for k, v in extra.items()}).logits.numpy()


def init_params(config, seed: int, model: nn.Module | None = None):
    """`blip2.init`'s parameters, unboxed, jitted (op by op it takes twice as long here)."""
    model = blip2.build(config) if model is None else model
    return jax.jit(lambda key: nn.unbox(blip2.init(config, key, model)["params"]))(jax.random.PRNGKey(seed))


def _adapted(kind: str, seed: int = 3):
    """(config, model, params): a random tiny model with adapters whose B is not zero (an adapter
    at its init computes nothing, and would hide every mapping error)."""
    base = config_lib.from_hf(ref.blip2_config(TEXT[kind]).to_dict())
    config = base.replace(lora=lora.LoraConfig(rank=4, alpha=8.0, dropout=0.1, targets=TARGETS[kind]))
    model = blip2.build(config)
    params = init_params(config, seed, model)
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: np.asarray(x) + (0.3 * rng.standard_normal(x.shape)).astype(x.dtype)
        if path[-1].key == lora.B else np.asarray(x), params)
    return config, model, params


def _write(tmp_path, config, params) -> model_checkpoint.CheckpointParams:
    flat = traverse_util.flatten_dict(params, sep="/")
    model_checkpoint.write(tmp_path / "ours", "Blip2ForConditionalGeneration", config, iter(flat.items()),
                           source="test")
    return model_checkpoint.CheckpointParams.open(tmp_path / "ours")


def _no_tokenizer_export(checkpoint, out, **kw):
    """`to_hf` without the processor files (these tests need none: they feed ids)."""
    return hf_export.to_hf(checkpoint, out, tokenizer="none", **kw)


@pytest.fixture(autouse=True)
def _skip_processor(no_processor_files):
    """These tests feed token ids, so `to_hf` writes no processor files."""


@pytest.mark.parametrize("kind", ["opt"])  # T5's names: the import test's round trip through PEFT's own adapter
def test_peft_runs_our_export_like_ours(kind, tmp_path):
    config, model, params = _adapted(kind)
    unmerged = _ours(model, params, kind)
    base_model = blip2.build(config.replace(lora=lora.LoraConfig()))
    merged = _ours(base_model, lora.merged(params), kind)
    np.testing.assert_allclose(merged, unmerged, atol=TOL, rtol=TOL)
    assert np.abs(_ours(base_model, lora.strip(params), kind) - unmerged).max() > 1e-2  # the adapters matter

    checkpoint = _write(tmp_path, config, params)
    out = _no_tokenizer_export(checkpoint, tmp_path / "hf")
    adapter = json.loads((out / hf_export.ADAPTER_DIR / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8.0 and adapter["lora_dropout"] == pytest.approx(0.1)
    hf = transformers.Blip2ForConditionalGeneration.from_pretrained(out).eval()
    peft_model = peft.PeftModel.from_pretrained(hf, out / hf_export.ADAPTER_DIR).eval()
    assert not peft_model.base_model.model.training
    theirs = _theirs(peft_model, kind)
    mask = _inputs(kind)[2].astype(bool) if kind == "opt" else np.ones(theirs.shape[:2], bool)
    np.testing.assert_allclose(unmerged[mask], theirs[mask], atol=TOL, rtol=TOL)
    n_adapted = sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in peft_model.modules())
    assert n_adapted == len(adapter["target_modules"]) == sum(
        1 if params_leaf.ndim == 2 else params_leaf.shape[0]
        for path, params_leaf in traverse_util.flatten_dict(params, sep="/").items() if path.endswith(lora.A))

    hf_merged = transformers.Blip2ForConditionalGeneration.from_pretrained(
        _no_tokenizer_export(checkpoint, tmp_path / "hf_merged", merge_lora=True)).eval()
    assert not (tmp_path / "hf_merged" / hf_export.ADAPTER_DIR).exists()
    np.testing.assert_allclose(_theirs(hf_merged, kind)[mask], theirs[mask], atol=TOL, rtol=TOL)


def _peft_adapter(kind: str, tmp_path, **lora_kw):
    """A PEFT adapter made by PEFT itself (random A and B) on a transformers model saved beside it."""
    hf = ref.generation_model(TEXT[kind], seed=5)
    hf.save_pretrained(tmp_path / "hf")
    lora_kw.setdefault("target_modules", r".*language_model.*\.(q_proj|v_proj|q|v)$|.*\.qkv$|.*qformer.*\.query$")
    config = peft.LoraConfig(r=2, lora_alpha=6, lora_dropout=0.05, init_lora_weights=False, **lora_kw)
    peft_model = peft.get_peft_model(hf, config).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    return peft_model


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_a_peft_adapter_imports_as_ours_and_exports_back(kind, tmp_path, blip2_jax):
    peft_model = _peft_adapter(kind, tmp_path)
    code, _, err = blip2_jax("convert", "from-hf", "--src", str(tmp_path / "hf"), "--out", str(tmp_path / "ours"),
                             "--adapter", str(tmp_path / "adapter"))
    assert code == 0, err
    checkpoint = model_checkpoint.CheckpointParams.open(tmp_path / "ours")
    assert checkpoint.config.lora.rank == 2 and checkpoint.config.lora.scaling == 3.0
    assert checkpoint.config.lora.dropout == pytest.approx(0.05)
    ours = _ours(blip2.build(checkpoint.config), checkpoint.tree(), kind)
    theirs = _theirs(peft_model, kind)
    mask = _inputs(kind)[2].astype(bool) if kind == "opt" else np.ones(theirs.shape[:2], bool)
    np.testing.assert_allclose(ours[mask], theirs[mask], atol=TOL, rtol=TOL)

    out = _no_tokenizer_export(checkpoint, tmp_path / "back")
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel

    first, again = (load_file(d / "adapter_model.safetensors") for d in (tmp_path / "adapter", out / "adapter"))
    assert first.keys() == again.keys()
    for key, value in first.items():
        np.testing.assert_array_equal(again[key], value, key)


@pytest.mark.parametrize("setting,message", [
    (dict(use_dora=True), "DoRA"), (dict(target_modules=["q_proj"], layers_to_transform=[0]), "layers_to_transform")])
def test_an_adapter_our_lora_cannot_express_is_refused(setting, message, tmp_path, blip2_jax):
    _peft_adapter("opt", tmp_path, **setting)
    code, _, err = blip2_jax("convert", "from-hf", "--src", str(tmp_path / "hf"), "--out", str(tmp_path / "ours"),
                             "--adapter", str(tmp_path / "adapter"))
    assert code == 2 and message in err and "adapter_config.json" in err
    assert not (tmp_path / "ours").exists()


def test_targets_that_match_nothing_are_refused():
    config = config_lib.from_hf(ref.blip2_config(ref.OPT).to_dict())
    with pytest.raises(UserError, match="match no dense layer"):
        blip2.abstract_params(config.replace(lora=lora.LoraConfig(rank=2, targets=("language_model/.*/nope$",))))
    with pytest.raises(UserError, match="adapts nothing"):
        lora.LoraConfig(rank=2)


def test_adapter_dropout_runs_only_on_a_training_pass():
    _, model, params = _adapted("opt")
    px, ids, mask, _ = _inputs("opt")

    evaluate = jax.jit(lambda tree: model.apply({"params": tree}, ref.nhwc(px), ids, mask, deterministic=True).logits)
    train = jax.jit(lambda tree: model.apply({"params": tree}, ref.nhwc(px), ids, mask, deterministic=False,
                                             rngs={"dropout": jax.random.PRNGKey(0)}).logits)
    without = jax.tree_util.tree_map_with_path(
        lambda path, x: np.zeros_like(x) if path[-1].key == lora.DROPOUT else x, params)
    np.testing.assert_array_equal(np.asarray(evaluate(params)), np.asarray(evaluate(without)))
    assert np.abs(np.asarray(train(params)) - np.asarray(train(without))).max() > 1e-3


def test_optimizer_state_exists_only_for_adapters_and_the_partition_at_opt2_7b_size():
    """`configs/lora.py:caption_coco_opt2.7b` on shapes alone (`build_layout` runs under
    `jax.eval_shape`): the train state mirrors exactly the stage-2 trainables and the adapters of the
    LLM's 32 x 4 attention projections; the LLM's and the ViT's kernels are frozen (bf16), the
    adapters' constants frozen in float32."""
    config = load_config("configs/lora.py", "caption_coco_opt2.7b")
    layout = build_layout(config, mesh_lib.make_mesh(fsdp=8))
    trainable = traverse_util.flatten_dict(layout.state_abstract.params, sep="/")
    adapters = {p for p in trainable if lora.is_adapter_leaf(p)}
    assert adapters == {f"language_model/model/decoder/layers/self_attn/{m}/lora_{ab}"
                        for m in ("q_proj", "k_proj", "v_proj", "out_proj") for ab in "ab"}
    assert all(trainable[p].shape in ((32, 2560, 16), (32, 16, 2560)) for p in adapters)
    assert {p.split("/")[0] for p in set(trainable) - adapters} == {
        "qformer", "query_tokens", "language_projection", "vision_model"}
    assert all(p.startswith("vision_model/post_layernorm/") for p in trainable if p.startswith("vision_model"))
    n_adapter = sum(int(np.prod(trainable[p].shape)) for p in adapters)
    assert n_adapter == 32 * 4 * 2 * 2560 * 16  # 10.5 M of the LLM's 2.7 B
    mirrored = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(layout.state_abstract.opt_state)[0]
                if leaf.ndim > 0]
    n_trainable = sum(int(np.prod(v.shape)) for v in trainable.values())
    assert sum(int(np.prod(v.shape)) for v in mirrored) == 2 * n_trainable  # Adam's mu and nu, nothing else
    frozen = traverse_util.flatten_dict(layout.frozen_abstract, sep="/")
    assert frozen["language_model/model/decoder/layers/self_attn/q_proj/kernel"].dtype == jnp.bfloat16
    assert {frozen[p].dtype for p in frozen if lora.is_constant(p)} == {jnp.dtype(jnp.float32)}


def source_checkpoint(directory, preset: str) -> dict[str, np.ndarray]:
    """A model checkpoint of random `preset` weights at `directory` (what `from-hf` makes of a
    published model), for a run's `init.checkpoint`; returns its leaves."""
    config = presets.get(preset)
    flat = traverse_util.flatten_dict(init_params(config, 7), sep="/")
    flat = {p: np.asarray(v) for p, v in flat.items()}
    model_checkpoint.write(directory, "Blip2ForConditionalGeneration", config, iter(flat.items()), source="test")
    return flat


@pytest.mark.slow  # compiles the tiny LoRA step: ~40 s on 2 cores
def test_the_tiny_lora_preset_trains_resumes_and_exports_to_peft(tmp_path, blip2_jax):
    """`configs/lora.py:tiny` through the real trainer, from a model checkpoint without adapters:
    fresh adapters are added to its weights, the adapters and the stage-2 trainables move, the LLM's
    and the ViT's weights stay the source's; a run killed after step 2 continues exactly; `blip2-jax
    convert to-hf` gives the base model and a PEFT adapter that transformers + PEFT run to our logits."""
    source = source_checkpoint(tmp_path / "source", "tiny")
    config = load_config("configs/lora.py", "tiny")
    config.init.checkpoint = str(tmp_path / "source")
    config.total_steps, config.optim.warmup_steps = 3, 1
    config.mesh.update(num_devices=1, data=1)
    config.checkpoint.update(every=1, async_save=False)
    config.log.tensorboard = False
    run = tmp_path / "run"
    loop.train(config, run)
    a = traverse_util.flatten_dict(CheckpointParams.open(run / "checkpoints" / "1").tree(), sep="/")
    b = traverse_util.flatten_dict(CheckpointParams.open(run).tree(), sep="/")
    moved = {p for p in a if not np.array_equal(a[p], b[p])}
    assert {p for p in b if p.endswith(f"/{lora.B}")} <= moved and "query_tokens" in moved
    frozen = [p for p in source if p.startswith(("language_model", "vision_model/encoder", "vision_model/embeddings"))]
    assert frozen and all(np.array_equal(b[p], source[p]) for p in frozen)

    assert_resumes_exactly(config, run, tmp_path / "resumed", 3)

    code, _, err = blip2_jax("convert", "to-hf", "--src", str(run), "--out", str(tmp_path / "hf"),
                             "--tokenizer", "none")
    assert code == 0, err
    hf, info = transformers.Blip2ForConditionalGeneration.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    peft_model = peft.PeftModel.from_pretrained(hf.eval(), tmp_path / "hf" / hf_export.ADAPTER_DIR).eval()
    loaded = weights.load(run)
    rng = np.random.default_rng(0)
    px = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    ids = np.concatenate([np.full((2, 8), 127), rng.integers(3, 120, (2, 5))], 1)
    mask = np.ones_like(ids)
    ours = blip2.build(loaded.config).apply({"params": loaded.params}, ref.nhwc(px), ids, mask).logits
    with torch.no_grad():
        theirs = peft_model(pixel_values=torch.tensor(px), input_ids=torch.tensor(ids),
                            attention_mask=torch.tensor(mask)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=TOL, rtol=TOL)


def test_generation_runs_adapters_on_int8_kernels_as_the_merged_float_model():
    """Beam search (unrolled layers, KV cache) over a tree with adapters on int8 LLM kernels
    (QLoRA's arrangement) gives the captions of the float model with the adapters merged into the
    dequantized kernels: the decoding path reads both transforms, not only the training path."""
    config, _, params = _adapted("opt")
    int8 = ("^language_model/",)
    quantized = quantization.quantize(params, int8)
    flat = traverse_util.flatten_dict(quantized, sep="/")
    for layer in quantization.quantized_layers(list(flat)):
        flat[f"{layer}/kernel"] = quantization.dequantize_kernel(np.asarray(flat[f"{layer}/kernel"]),
                                                                 np.asarray(flat.pop(f"{layer}/{quantization.SCALE}")))
    merged = lora.merged(traverse_util.unflatten_dict(flat, sep="/"))
    tokenizer = tiny_opt_tokenizer()
    images = [np.random.default_rng(i).integers(0, 256, (30, 30, 3), dtype=np.uint8) for i in range(3)]
    search = GenerationConfig(num_beams=3, max_new_tokens=6, min_new_tokens=2)
    prompts = ["a photo of", "w1 w2", "w3"]
    ours = Blip2Generator(blip2.build(config.replace(int8=int8)), quantized, tokenizer, batch_size=4).caption(
        images, prompts, search)
    reference = Blip2Generator(blip2.build(config.replace(lora=lora.LoraConfig())), merged, tokenizer,
                               batch_size=4).caption(images, prompts, search)
    assert ours == reference and len(set(ours)) > 1
