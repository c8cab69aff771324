"""`blip2-jax convert`: Hugging Face <-> model checkpoints <-> LAVIS, checked against the tiny
random `transformers` models of the parity tests (every tensor bit-exact in fp32), against
`transformers` loading and running the exported directories, and on corrupt inputs."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from absl import app
from flax import linen as nn
from flax import traverse_util
from safetensors.numpy import load_file

from blip2_jax import cli
from blip2_jax.convert import hf_export, lavis
from blip2_jax.data.images import preprocess_images
from blip2_jax.errors import UserError
from blip2_jax.generation.api import Blip2Generator
from blip2_jax.generation.config import GenerationConfig
from blip2_jax.models import blip2, presets
from blip2_jax.models import config as config_lib
from blip2_jax.parallel import mesh as mesh_lib
from blip2_jax.weights import load as weights
from blip2_jax.weights import model_checkpoint
from blip2_jax.weights.hf_names import CheckpointMismatchError
from tests.reference import hf_models as ref
from tests.reference.tokenizers import tiny_opt_tokenizer, word_tokenizer

os.environ["HF_HUB_OFFLINE"] = "1"  # a mistyped path must fail, not reach for the hub
KINDS = ("opt", "t5", "itm")


def _t5_tokenizer(vocab_size: int = ref.T5["vocab_size"]) -> transformers.PreTrainedTokenizerFast:
    """Word-level with T5's ids (`<pad>` 0, `</s>` 1 appended) and `<image>` at 4."""
    vocab = ["<pad>", "</s>", "<unk>", "a", "<image>"] + [f"w{i}" for i in range(vocab_size - 5)]
    return word_tokenizer(vocab, "$A </s>", {"</s>": 1}, eos_token="</s>", pad_token="<pad>")


def _bert_vocab(directory: Path, qformer_vocab: int) -> Path:
    """A BERT vocab.txt one short of the Q-Former vocabulary (`[DEC]` is added on top)."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(qformer_vocab - 6)]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(words) + "\n")
    return directory


def _hf_model(kind: str, qformer_layers: int = ref.QFORMER["num_hidden_layers"]):
    if kind == "itm":
        return ref.retrieval_model(seed=2, qformer_layers=qformer_layers)
    return ref.generation_model(ref.OPT if kind == "opt" else ref.T5, seed=2, qformer_layers=qformer_layers)


def _save_hf(kind: str, directory: Path, qformer_layers: int = ref.QFORMER["num_hidden_layers"]):
    """A tiny Hugging Face model of `kind` saved with its tokenizer at `directory`; returns the model."""
    model = _hf_model(kind, qformer_layers)
    model.save_pretrained(directory)
    if kind == "opt":
        tiny_opt_tokenizer().save_pretrained(directory)
    elif kind == "t5":
        _t5_tokenizer().save_pretrained(directory)
    else:
        _bert_vocab(directory, ref.QFORMER["vocab_size"])
    return model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """A saved tiny Hugging Face model per kind, with its tokenizer, and the model object."""
    out = {}
    for kind in KINDS:
        directory = tmp_path_factory.mktemp(f"hf_{kind}")
        out[kind] = (directory, _save_hf(kind, directory))
    return out


def _loaded(directory: Path, kind: str):
    cls = transformers.Blip2ForImageTextRetrieval if kind == "itm" else transformers.Blip2ForConditionalGeneration
    model, info = cls.from_pretrained(directory, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, info  # no missing, unexpected or mismatched weights
    return model.eval()


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def _flat(tree) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def _no_partial_left(directory: Path) -> None:
    assert not [p.name for p in directory.iterdir() if ".partial-" in p.name]


@pytest.mark.parametrize("kind", KINDS)
def test_hf_to_orbax_to_hf_reproduces_every_tensor(hf_dirs, kind, tmp_path):
    _assert_round_trip(*hf_dirs[kind], kind, tmp_path)


@pytest.mark.parametrize("kind,qformer_layers", [("opt", 3), ("t5", 5), ("itm", 3), ("itm", 5)])
def test_any_qformer_depth_round_trips(kind, qformer_layers, tmp_path):
    """Q-Formers of 3 and 5 layers (cross-attention every 2nd): the last group is a single layer."""
    hf = _save_hf(kind, tmp_path / "hf", qformer_layers)
    assert len(hf.qformer.encoder.layer) == qformer_layers
    _assert_round_trip(tmp_path / "hf", hf, kind, tmp_path)


def _assert_round_trip(directory: Path, hf: torch.nn.Module, kind: str, tmp_path: Path) -> None:
    """HF directory -> our checkpoint -> HF shards: every tensor bit for bit, loadable, with processor."""
    ours = hf_export.from_hf(directory, tmp_path / "orbax")
    assert ours.architecture == ("Blip2ForImageTextRetrieval" if kind == "itm" else "Blip2ForConditionalGeneration")
    hf_export.to_hf(tmp_path / "orbax", tmp_path / "back", max_shard_size="20KB")  # the tokenizer travelled along
    back = tmp_path / "back"
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3  # really sharded
    original = ref.state_dict(hf)
    written = {}
    for shard in set(index["weight_map"].values()):
        written.update(load_file(back / shard))
    assert set(written) <= set(original)
    for name, value in written.items():
        assert value.dtype == original[name].dtype and np.array_equal(value, original[name]), name
    _assert_same_state(_loaded(back, kind), hf)  # the tied tensors transformers did not need written too
    processor = transformers.Blip2Processor.from_pretrained(back)
    assert processor.num_query_tokens == ref.NUM_QUERY_TOKENS
    if kind != "itm":
        assert processor.tokenizer.convert_tokens_to_ids("<image>") == ref.IMAGE_TOKEN_INDEX
        assert json.loads((back / "config.json").read_text())["image_token_index"] == ref.IMAGE_TOKEN_INDEX
    _no_partial_left(tmp_path)


def _random_params(architecture: str, config: config_lib.Blip2Config, seed: int = 0) -> dict[str, np.ndarray]:
    """Our freshly initialised parameters, every leaf moved off its init value."""
    model = blip2.build(config, architecture)
    params = nn.unbox(blip2.init(config, jax.random.PRNGKey(seed), model)["params"])
    rng = np.random.default_rng(seed)
    return {k: (np.asarray(v) + 0.05 * rng.standard_normal(v.shape)).astype(v.dtype)
            for k, v in _flat(params).items()}


def _write_ours(out: Path, architecture: str, config: config_lib.Blip2Config, params: dict[str, np.ndarray],
                tokenizer_dir: Path | None = None) -> Path:
    files = sorted(tokenizer_dir.iterdir()) if tokenizer_dir is not None else ()
    return model_checkpoint.write(out, architecture, config, iter(params.items()), source="test",
                                  copy_files=files)


def _tokenizer_for(preset: str, directory: Path) -> Path:
    """A tokenizer whose `<image>` lands on the preset's image_token_index (127 of 128)."""
    config = presets.get(preset)
    if config.text is None:
        return _bert_vocab(directory, config.qformer.vocab_size)
    if config.text.model_type == "opt":
        vocab = ["<s>", "<pad>", "</s>", "<unk>"] + [f"w{i}" for i in range(config.image_token_index - 4)]
        tok = word_tokenizer(vocab, "<s> $A", {"<s>": 0}, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    else:
        vocab = ["<pad>", "</s>", "<unk>"] + [f"w{i}" for i in range(config.image_token_index - 3)]
        tok = word_tokenizer(vocab, "$A </s>", {"</s>": 1}, eos_token="</s>", pad_token="<pad>")
    tok.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("preset,architecture", [("tiny", "Blip2ForConditionalGeneration"),
                                                 ("tiny_t5", "Blip2ForConditionalGeneration"),
                                                 ("tiny_itm", "Blip2Stage1")])
def test_orbax_to_hf_to_orbax_reproduces_our_parameters(preset, architecture, tmp_path):
    config = presets.get(preset)
    params = _random_params(architecture, config)
    _write_ours(tmp_path / "ours", architecture, config, params, _tokenizer_for(preset, tmp_path / "tok"))
    hf_export.to_hf(tmp_path / "ours", tmp_path / "hf")
    kind = "itm" if config.text is None else config.text.model_type
    _loaded(tmp_path / "hf", kind)  # transformers takes it without complaint
    if architecture == "Blip2Stage1":  # what no Hugging Face class holds rides in the side file
        assert set(load_file(tmp_path / "hf" / hf_export.STAGE1_EXTRAS)) == {
            "temp", "cls.predictions.bias", "cls.predictions.transform.dense.weight",
            "cls.predictions.transform.dense.bias", "cls.predictions.transform.LayerNorm.weight",
            "cls.predictions.transform.LayerNorm.bias"}
    back = hf_export.from_hf(tmp_path / "hf", tmp_path / "back")
    assert back.architecture == architecture and back.config == config
    again = _flat(back.tree())
    assert again.keys() == params.keys()
    for path, value in params.items():
        assert again[path].dtype == value.dtype and np.array_equal(again[path], value), path

    hf_export.to_hf(tmp_path / "ours", tmp_path / "hf16", dtype="bfloat16")
    from safetensors.torch import load_file as torch_load  # pylint: disable=import-outside-toplevel

    full, half = torch_load(tmp_path / "hf" / "model.safetensors"), torch_load(tmp_path / "hf16" / "model.safetensors")
    assert full.keys() == half.keys() and all(torch.equal(half[k], full[k].to(torch.bfloat16)) for k in full)
    halved = _flat(hf_export.from_hf(tmp_path / "hf16", tmp_path / "back16").tree())
    for path, value in params.items():
        np.testing.assert_array_equal(halved[path], value.astype(ml_dtypes.bfloat16).astype(np.float32), path)


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_exported_model_runs_in_transformers_like_ours(kind, tmp_path):
    """Our parameters (not converted from HF) exported, then run by transformers: logits within
    1e-4 and beam-search captions identical, on Blip2Processor's own inputs."""
    # transformers 5 cannot beam-search a T5 deeper in its decoder than its encoder: a symmetric one
    text = ref.OPT if kind == "opt" else dict(ref.T5, num_decoder_layers=ref.T5["num_layers"])
    config = config_lib.from_hf(ref.blip2_config(text).to_dict())
    params = _random_params("Blip2ForConditionalGeneration", config, seed=4)
    tokenizer = tiny_opt_tokenizer() if kind == "opt" else _t5_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tok")
    _write_ours(tmp_path / "ours", "Blip2ForConditionalGeneration", config, params, tmp_path / "tok")
    hf_export.to_hf(tmp_path / "ours", tmp_path / "hf")
    hf = _loaded(tmp_path / "hf", kind)
    processor = transformers.Blip2Processor.from_pretrained(tmp_path / "hf")
    processor.tokenizer.padding_side = "left" if kind == "opt" else "right"  # T5's relative positions see padding
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (30, 30, 3), dtype=np.uint8) for _ in range(3)]
    prompts = ["a photo of", "w1 w2", "w3"] if kind == "opt" else ["a w1", "w2 w3 w4", "a"]
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    np.testing.assert_allclose(inputs["pixel_values"].numpy().transpose(0, 2, 3, 1), preprocess_images(images, 30),
                               atol=1e-5)

    model = blip2.Blip2ForConditionalGeneration(config)
    tree = traverse_util.unflatten_dict(params, sep="/")
    decoder = {}
    if kind == "t5":
        decoder_ids = np.array([[0, 7, 9, 11]] * 3)
        decoder = dict(decoder_input_ids=decoder_ids)
    pixels = inputs["pixel_values"].numpy().transpose(0, 2, 3, 1)
    ours = model.apply({"params": tree}, pixels, inputs["input_ids"].numpy(), inputs["attention_mask"].numpy(),
                       **decoder).logits
    with torch.no_grad():
        theirs = hf(**inputs, **{k: torch.tensor(v) for k, v in decoder.items()}).logits.numpy()
    mask = inputs["attention_mask"].numpy().astype(bool) if kind == "opt" else np.ones(theirs.shape[:2], bool)
    np.testing.assert_allclose(np.asarray(ours)[mask], theirs[mask], atol=1e-4, rtol=1e-4)

    search = GenerationConfig(num_beams=3, max_new_tokens=6, min_new_tokens=2)
    texts = Blip2Generator(model, tree, tokenizer, batch_size=4).caption(images, prompts, search)
    with torch.no_grad():
        out = hf.generate(**inputs, num_beams=3, max_new_tokens=6, min_new_tokens=2, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1]:] if kind == "opt" else out
    expected = [t.strip() for t in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]
    assert texts == expected and all(expected) and len(set(expected)) > 1


# ---------------------------------------------------------------------------------------------
# LAVIS

_LAVIS_PREFIXES = [  # spec §12, HF -> LAVIS, first match
    ("vision_model.embeddings.class_embedding", "visual_encoder.cls_token"),
    ("vision_model.embeddings.position_embedding", "visual_encoder.pos_embed"),
    ("vision_model.embeddings.patch_embedding", "visual_encoder.patch_embed.proj"),
    ("vision_model.encoder.layers.", "visual_encoder.blocks."), ("vision_model.post_layernorm", "ln_vision"),
    ("qformer.layernorm", "Qformer.bert.embeddings.LayerNorm"), ("qformer.encoder", "Qformer.bert.encoder"),
    ("embeddings.", "Qformer.bert.embeddings."), ("cls.", "Qformer.cls."), ("vision_projection", "vision_proj"),
    ("text_projection", "text_proj"), ("language_projection", "opt_proj"), ("language_model.", "opt_model.")]
_LAVIS_INFIXES = [("layer_norm", "norm"), ("self_attn.projection", "attn.proj"), ("self_attn.qkv", "attn.qkv"),
                  ("attention.attention.", "attention.self.")]


def _lavis_names(hf_state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A LAVIS state dict written from the spec §12 table, independently of `convert.lavis`."""
    out = {}
    for name, value in hf_state.items():
        old, new = next(((o, n) for o, n in _LAVIS_PREFIXES if name.startswith(o)), ("", ""))
        name = new + name[len(old):]
        for a, b in _LAVIS_INFIXES:
            name = name.replace(a, b)
        if name.endswith("attn.qkv.bias"):  # [q ; 0 ; v] -> q_bias, v_bias
            d = value.shape[0] // 3
            out[name.replace("qkv.bias", "q_bias")], out[name.replace("qkv.bias", "v_bias")] = value[:d], value[2 * d:]
        else:
            out[name] = value
    return out


@pytest.fixture(scope="module")
def stage1_lavis(hf_dirs, tmp_path_factory):
    """A LAVIS stage-1 checkpoint (no ViT, as LAVIS saves it) and the ViT in eva_vit_g.pth form,
    from the tiny HF retrieval model plus a random Q-Former LM head and temp."""
    directory = tmp_path_factory.mktemp("lavis1")
    _, hf = hf_dirs["itm"]
    config = config_lib.from_hf(hf.config.to_dict())
    rng = np.random.default_rng(1)
    d, vocab = config.qformer.hidden_size, config.qformer.vocab_size
    state = _lavis_names(ref.state_dict(hf))
    state.update({"Qformer.cls.predictions.bias": rng.standard_normal(vocab, np.float32),
                  "Qformer.cls.predictions.transform.dense.weight": rng.standard_normal((d, d), np.float32),
                  "Qformer.cls.predictions.transform.dense.bias": rng.standard_normal(d, np.float32),
                  "Qformer.cls.predictions.transform.LayerNorm.weight": rng.standard_normal(d, np.float32),
                  "Qformer.cls.predictions.transform.LayerNorm.bias": rng.standard_normal(d, np.float32),
                  "temp": np.array(0.0625, np.float32)})
    state["Qformer.cls.predictions.decoder.weight"] = state["Qformer.bert.embeddings.word_embeddings.weight"]
    state["Qformer.cls.predictions.decoder.bias"] = state["Qformer.cls.predictions.bias"]
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
    tensors["Qformer.bert.embeddings.position_ids"] = torch.arange(config.qformer.max_position_embeddings)[None]
    vit = {k[len("visual_encoder."):]: tensors.pop(k) for k in list(tensors) if k.startswith("visual_encoder.")}
    torch.save({"model": tensors}, directory / "blip2_pretrained.pth")
    torch.save(vit, directory / "eva_vit_g.pth")
    return dict(dir=directory, config=config, hf=hf, model=tensors, vit=vit)


def test_lavis_stage1_to_orbax_to_lavis_reproduces_it(stage1_lavis, tmp_path, hf_dirs):
    src = stage1_lavis["dir"]
    with pytest.raises(ValueError, match="--vision eva_vit_g.pth"):
        lavis.from_lavis(src / "blip2_pretrained.pth", tmp_path / "x", stage1_lavis["config"])
    ours, notes = lavis.from_lavis(src / "blip2_pretrained.pth", tmp_path / "ours", stage1_lavis["config"],
                                   vision=src / "eva_vit_g.pth")
    assert ours.architecture == "Blip2Stage1"
    assert any("position_ids" in n for n in notes) and any("decoder.weight" in n for n in notes)
    lavis.to_lavis(tmp_path / "ours", tmp_path / "back.pth", vision_out=tmp_path / "vit.pth")
    for written, original in ((torch.load(tmp_path / "back.pth", weights_only=True)["model"], stage1_lavis["model"]),
                              (torch.load(tmp_path / "vit.pth", weights_only=True), stage1_lavis["vit"])):
        assert written.keys() == original.keys()
        for key in original:
            assert written[key].dtype == original[key].dtype and torch.equal(written[key], original[key]), key
    # and the same weights are the Hugging Face model they were written from, but for the key slice
    # of qkv.bias, which LAVIS does not have (zero) and which softmax ignores
    shutil.copy(hf_dirs["itm"][0] / "vocab.txt", tmp_path / "ours" / "vocab.txt")
    hf_export.to_hf(tmp_path / "ours", tmp_path / "hf")
    got, want = _loaded(tmp_path / "hf", "itm").state_dict(), stage1_lavis["hf"].state_dict()
    assert got.keys() == want.keys()
    for name, value in want.items():
        if name.endswith("qkv.bias"):
            d = value.shape[0] // 3
            assert not got[name][d:2 * d].any()
            value = torch.cat([value[:d], torch.zeros(d), value[2 * d:]])
        assert torch.equal(got[name], value), name


def test_lavis_stage2_takes_the_towers_from_their_own_files(hf_dirs, tmp_path):
    """Stage-2 OPT: the .pth holds the Q-Former query path, ln_vision and opt_proj; the ViT comes
    from eva_vit_g.pth (with an extra block, dropped, and a smaller position table, interpolated)
    and OPT from its HF directory saved as the bare model with fewer embedding rows (padded)."""
    directory, hf = hf_dirs["opt"]
    config = config_lib.from_hf(hf.config.to_dict())
    full = _lavis_names(ref.state_dict(hf))
    pth = {k: torch.from_numpy(np.array(v)) for k, v in full.items()
           if not k.startswith(("visual_encoder.", "opt_model."))}
    vit = {k[len("visual_encoder."):]: torch.from_numpy(np.array(v)) for k, v in full.items()
           if k.startswith("visual_encoder.")}
    vit.update({k.replace("blocks.1.", "blocks.2."): v.clone() for k, v in vit.items() if k.startswith("blocks.1.")})
    grid, dim = config.vision.grid, config.vision.hidden_size
    small = torch.randn(1, 1 + 10 * 10, dim)  # a 10x10 table for the model's 15x15 grid: interpolated
    vit["pos_embed"] = small
    patches = small[:, 1:].reshape(1, 10, 10, dim).permute(0, 3, 1, 2)
    resized = torch.nn.functional.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    want_pos = torch.cat([small[:, :1], resized.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)], 1).numpy()
    torch.save({"model": pth}, tmp_path / "stage2.pth")
    torch.save(vit, tmp_path / "eva_vit_g.pth")
    opt = hf.language_model
    rows = config.text.vocab_size - 3
    text = {k[len("model."):] if k.startswith("model.") else k: v[:rows] if "embed_tokens" in k else v
            for k, v in ref.state_dict(opt).items() if k != "lm_head.weight"}
    (tmp_path / "opt").mkdir()
    from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel

    save_file({k: np.ascontiguousarray(v) for k, v in text.items()}, tmp_path / "opt" / "model.safetensors")
    (tmp_path / "opt" / "config.json").write_text(opt.config.to_json_string())

    ours, notes = lavis.from_lavis(tmp_path / "stage2.pth", tmp_path / "ours", config, vision=tmp_path / "eva_vit_g.pth",
                                   text=tmp_path / "opt")
    assert any("blocks.2." in n and "first 2 ViT blocks" in n for n in notes)
    assert any(f"from {rows} to {config.text.vocab_size} rows" in n for n in notes)
    assert any("from 101 to 226 positions" in n for n in notes)
    reference = _flat(hf_export.from_hf(directory, tmp_path / "from_hf").tree())
    got = _flat(ours.tree())
    assert got.keys() == reference.keys()
    embed = "language_model/model/decoder/embed_tokens/embedding"
    for path, value in reference.items():
        if path == embed:
            np.testing.assert_array_equal(got[path][:rows], value[:rows])
            assert not got[path][rows:].any()
        elif path == "vision_model/embeddings/position_embedding":  # as torch's bicubic resize
            np.testing.assert_allclose(got[path], want_pos, atol=1e-5)
        elif path.endswith("qkv/bias"):  # LAVIS has no key bias: zero there, the rest exact
            d = value.shape[-1] // 3
            np.testing.assert_array_equal(got[path], np.concatenate(
                [value[:, :d], np.zeros_like(value[:, :d]), value[:, 2 * d:]], axis=-1))
        else:
            np.testing.assert_array_equal(got[path], value, err_msg=path)
    # the same files read straight into the shardings of a mesh (`weights.load`), no checkpoint written
    with pytest.raises(UserError, match="a LAVIS .pth names no model config; open it with"):
        weights.load(tmp_path / "stage2.pth")
    mesh = mesh_lib.make_mesh(data=2, fsdp=2, tensor=2)
    placed = weights.load(weights.open_lavis(tmp_path / "stage2.pth", config, vision=tmp_path / "eva_vit_g.pth",
                                             text=tmp_path / "opt"), mesh=mesh)
    assert (placed.architecture, placed.tokenizer) == (ours.architecture, str(tmp_path / "opt"))
    shardings = traverse_util.flatten_dict(mesh_lib.logical_shardings(blip2.abstract_params(config, unbox=False),
                                                                      mesh), sep="/")
    leaves = traverse_util.flatten_dict(placed.params, sep="/")
    assert leaves.keys() == got.keys() and sum(any(v.sharding.spec) for v in leaves.values()) > 10
    for path, value in leaves.items():
        assert value.sharding == shardings[path], path
        np.testing.assert_array_equal(np.asarray(value), got[path], err_msg=path)


def test_lavis_inputs_that_are_not_blip2_are_named(stage1_lavis, tmp_path):
    config = stage1_lavis["config"]
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="list.pth holds list, not a state dict"):
        lavis.from_lavis(tmp_path / "list.pth", tmp_path / "x", config)
    (tmp_path / "junk.pth").write_bytes(b"not a zip or a pickle")
    with pytest.raises(ValueError, match="junk.pth is not a loadable PyTorch state dict"):
        lavis.from_lavis(tmp_path / "junk.pth", tmp_path / "x", config)
    odd = dict(stage1_lavis["model"], **{"Qformer.bert.pooler.dense.weight": torch.zeros(2, 2)})
    torch.save({"model": odd}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointMismatchError, match="Qformer.bert.pooler.dense.weight"):
        lavis.from_lavis(tmp_path / "odd.pth", tmp_path / "x", config, vision=stage1_lavis["dir"] / "eva_vit_g.pth")
    untied = dict(stage1_lavis["model"])
    untied["Qformer.cls.predictions.decoder.bias"] = untied["Qformer.cls.predictions.bias"] + 1
    torch.save({"model": untied}, tmp_path / "untied.pth")
    with pytest.raises(CheckpointMismatchError, match="decoder.bias must equal Qformer.cls.predictions.bias"):
        lavis.from_lavis(tmp_path / "untied.pth", tmp_path / "x", config, vision=stage1_lavis["dir"] / "eva_vit_g.pth")
    assert not (tmp_path / "x").exists()
    _no_partial_left(tmp_path)


# ---------------------------------------------------------------------------------------------
# Corrupt inputs: a clear error, and nothing at --out.

def _sharded_copy(hf_dirs, tmp_path) -> Path:
    directory, hf = hf_dirs["opt"]
    copy = tmp_path / "sharded"
    hf.save_pretrained(copy, max_shard_size="20KB")
    shutil.copy(directory / "tokenizer.json", copy)
    assert (copy / "model.safetensors.index.json").is_file()
    return copy


def test_corrupt_hugging_face_inputs_leave_nothing_behind(hf_dirs, tmp_path):
    src = _sharded_copy(hf_dirs, tmp_path)
    shards = sorted(src.glob("model-*.safetensors"))
    out = tmp_path / "out"

    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=f"{shards[1].name} is not a readable safetensors file"):
        hf_export.from_hf(src, out)
    shards[1].write_bytes(data)

    shards[2].rename(tmp_path / "aside")
    with pytest.raises(FileNotFoundError, match=shards[2].name):
        hf_export.from_hf(src, out)
    (tmp_path / "aside").rename(shards[2])

    config = json.loads((src / "config.json").read_text())
    config["qformer_config"]["intermediate_size"] += 1
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError, match="intermediate_query.dense.weight: shape"):
        hf_export.from_hf(src, out)
    assert not out.exists()
    _no_partial_left(tmp_path)


def test_export_refuses_a_bad_tokenizer_or_an_existing_out(hf_dirs, tmp_path):
    ours = tmp_path / "ours"
    hf_export.from_hf(hf_dirs["opt"][0], ours)
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="exists"):
        hf_export.to_hf(ours, tmp_path / "exists")
    wrong = tmp_path / "wrong_tok"
    vocab = ["<s>", "<pad>", "</s>", "<unk>", "a", "b"]
    word_tokenizer(vocab, "<s> $A", {"<s>": 0}, bos_token="<s>", eos_token="</s>",
                   pad_token="<pad>").save_pretrained(wrong)
    with pytest.raises(ValueError, match="gives <image> the id 6, but the model's image_token_index is 4"):
        hf_export.to_hf(ours, tmp_path / "out", tokenizer=str(wrong))
    itm = hf_export.from_hf(hf_dirs["itm"][0], tmp_path / "itm")
    with pytest.raises(FileNotFoundError, match="tokenizer directory .*nothing_here not found"):
        hf_export.to_hf(itm.source, tmp_path / "out", tokenizer=str(tmp_path / "nothing_here"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"from .*empty has 6 tokens with \[DEC\], the model's Q-Former vocabulary 99"):
        hf_export.to_hf(itm.source, tmp_path / "out", tokenizer=str(tmp_path / "empty"))
    assert not (tmp_path / "out").exists()
    _no_partial_left(tmp_path)


def test_cli_converts_both_ways(hf_dirs, tmp_path, capsys):
    src = hf_dirs["t5"][0]
    cli.main(["blip2-jax", "convert", "from-hf", "--src", str(src), "--out", str(tmp_path / "o")])
    assert "Blip2ForConditionalGeneration" in capsys.readouterr().out
    cli.main(["blip2-jax", "convert", "to-hf", "--src", str(tmp_path / "o"), "--out", str(tmp_path / "h"),
              "--out_dtype", "float16"])
    _loaded(tmp_path / "h", "t5")
    assert {v.dtype for v in load_file(tmp_path / "h" / "model.safetensors").values()} == {np.dtype(np.float16)}
    with pytest.raises(app.UsageError, match="--model"):
        cli.main(["blip2-jax", "convert", "from-lavis", "--src", "x.pth", "--out", "y"])


# ---------------------------------------------------------------------------------------------
# A training run: export its workdir, and start a new run from the export.

def assert_stage1_run_exports_exactly(workdir: Path, trained: dict[str, np.ndarray], tmp_path: Path) -> None:
    """`to_hf` of a stage-1 training workdir (what `convert to-hf --checkpoint` runs) loads in
    `transformers`, and `from_hf` of that export (in `tmp_path / "back"`) gives back every trained
    tensor bit for bit."""
    vocab = model_checkpoint.CheckpointParams.open(workdir).config.qformer.vocab_size
    hf_export.to_hf(workdir, tmp_path / "hf", tokenizer=str(_bert_vocab(tmp_path / "bert", vocab)))
    _loaded(tmp_path / "hf", "itm")
    back = _flat(hf_export.from_hf(tmp_path / "hf", tmp_path / "back").tree())
    assert back.keys() == trained.keys()
    for path, value in trained.items():
        np.testing.assert_array_equal(back[path], value, err_msg=path)


@pytest.mark.slow
def test_a_training_run_exports_and_a_new_run_starts_from_the_export(tmp_path):
    """Through the real trainer (slow: compiling the stage-1 step takes about a minute on CPU)."""
    from blip2_jax.train import init as init_lib  # pylint: disable=import-outside-toplevel
    from blip2_jax.train import layout  # pylint: disable=import-outside-toplevel
    from blip2_jax.train.partition import merge, partition, patterns_for  # pylint: disable=import-outside-toplevel
    from tests.test_train import load_config, train_tiny_stage1  # pylint: disable=import-outside-toplevel

    train_tiny_stage1(tmp_path / "run")

    run = model_checkpoint.CheckpointParams.open(tmp_path / "run")
    assert run.architecture == "Blip2Stage1" and run.source.endswith("step 2")
    trained = _flat(run.tree())
    first = _flat(model_checkpoint.CheckpointParams.open(tmp_path / "run" / "checkpoints" / "1").tree())
    assert not np.array_equal(first["query_tokens"], trained["query_tokens"])  # step 2, not step 1
    assert_stage1_run_exports_exactly(tmp_path / "run", trained, tmp_path)

    again = load_config("configs/stage1.py", "tiny")
    again.init.checkpoint = str(tmp_path / "back")
    model, cfg, _ = layout.build_objective(again)
    patterns = patterns_for(again.trainable)
    shardings = partition(mesh_lib.logical_shardings(blip2.abstract_params(cfg, unbox=False, model=model),
                                                     mesh_lib.make_mesh(data=2, fsdp=2, tensor=2)), patterns)
    started = _flat(jax.device_get(merge(*init_lib.initial_params(again, model, cfg, patterns, shardings))))
    assert started.keys() == trained.keys()
    for path, value in trained.items():
        np.testing.assert_array_equal(started[path], value, err_msg=path)

    hf_export.from_hf(tmp_path / "hf", tmp_path / "back16", dtype="bfloat16")  # stored in bf16 ...
    again.init.checkpoint = str(tmp_path / "back16")
    halved = _flat(jax.device_get(merge(*init_lib.initial_params(again, model, cfg, patterns, shardings))))
    for path, value in trained.items():  # ... still starts in the model's float32, at the rounded values
        assert halved[path].dtype == np.float32, path
        np.testing.assert_array_equal(halved[path], value.astype(ml_dtypes.bfloat16).astype(np.float32), path)

    again.model.qformer.intermediate_size += 8
    model, cfg, _ = layout.build_objective(again)
    with pytest.raises(ValueError, match=r"does not match config.model (?s:.)*intermediate_size: 72 vs 64"):
        init_lib.initial_params(again, model, cfg, patterns, shardings)
    stage2 = load_config("configs/stage2_opt.py", "tiny")
    stage2.init.checkpoint = str(tmp_path / "back")
    model, cfg, _ = layout.build_objective(stage2)
    with pytest.raises(ValueError, match="holds a Blip2Stage1; stage2 trains a Blip2ForConditionalGeneration"):
        init_lib.initial_params(stage2, model, cfg, patterns_for(stage2.trainable), (None, None))
