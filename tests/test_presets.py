"""Presets: full-size parameter counts against `transformers` (meta device), logical axis names
on every parameter, every config file loads (issue "model family" Done-when 4 and 5)."""
import dataclasses
import importlib.util
import pathlib

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import linen as nn
from flax import traverse_util

from blip2_jax.models import blip2, presets
from blip2_jax.models import config as config_lib
from blip2_jax.train import partition

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOWERS = ("vision_model", "query_tokens", "qformer", "language_projection", "language_model", "embeddings",
          "vision_projection", "text_projection", "itm_head")


def _tower_counts(flat: dict[tuple[str, ...], tuple[int, ...]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for path, shape in flat.items():
        counts[path[0]] = counts.get(path[0], 0) + int(np.prod(shape))
    return counts


def _hf_config(cfg: config_lib.Blip2Config):
    return (transformers.InstructBlipConfig if cfg.instruction_aware else transformers.Blip2Config)(
        **config_lib.to_hf(cfg))


def _hf_counts(cfg: config_lib.Blip2Config) -> dict[str, int]:
    hf_cfg = _hf_config(cfg)
    cls = transformers.Blip2ForImageTextRetrieval if cfg.text is None else \
        transformers.InstructBlipForConditionalGeneration if cfg.instruction_aware else \
        transformers.Blip2ForConditionalGeneration
    with torch.device("meta"):
        model = cls(hf_cfg)
        if isinstance(cfg.text, config_lib.T5Config):
            # The published FlanT5 checkpoints have their own lm_head (transformers unties it on load).
            lm = model.language_model
            lm.lm_head.weight = torch.nn.Parameter(torch.empty_like(lm.lm_head.weight))
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():  # tied tensors are listed once
        tower = name.split(".")[0]
        counts[tower] = counts.get(tower, 0) + p.numel()
    return counts


@pytest.mark.parametrize("name", presets.PUBLISHED)
def test_full_size_parameter_counts_match_transformers(name):
    cfg = presets.get(name)
    flat = {k: v.shape for k, v in traverse_util.flatten_dict(blip2.abstract_params(cfg)).items()}
    ours, theirs = _tower_counts(flat), _hf_counts(cfg)
    assert ours == theirs
    assert set(ours) <= set(TOWERS)


def test_published_sizes_are_the_papers():
    """Sanity of the presets themselves: ViT-g ~1.0B, Q-Former ~105M in a generation model (spec §1)."""
    counts = _tower_counts({k: v.shape for k, v in
                            traverse_util.flatten_dict(blip2.abstract_params(presets.get("opt2.7b"))).items()})
    assert 0.98e9 < counts["vision_model"] < 1.0e9
    assert 100e6 < counts["qformer"] + counts["query_tokens"] + counts["language_projection"] < 110e6


@pytest.mark.parametrize("name", ["tiny", "tiny_t5", "tiny_itm", "itm_vit_l", "flant5xl_vit_l"])
def test_every_parameter_has_logical_axis_names(name):
    boxed = blip2.abstract_params(presets.get(name), unbox=False)
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves
    for leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), f"a parameter without logical axis names: {leaf}"
        assert len(leaf.names) == leaf.value.ndim, (leaf.names, leaf.value.shape)


def test_scanned_stacks_carry_the_layers_axis():
    boxed = blip2.abstract_params(presets.get("tiny"), unbox=False)
    flat = traverse_util.flatten_dict(boxed, is_leaf=lambda _, x: isinstance(x, nn.Partitioned))
    kernel = flat[("vision_model", "encoder", "layers", "self_attn", "qkv", "kernel")]
    assert kernel.names == ("layers", "embed", "heads")


@pytest.mark.parametrize("name", presets.names())
def test_presets_round_trip_through_config_dict(name):
    cfg = presets.get(name)
    assert presets.from_config_dict(presets.to_config_dict(cfg)) == cfg


@pytest.mark.parametrize("name", [n for n in presets.names() if presets.get(n).vision.variant == "eva"])
def test_presets_round_trip_through_hf_config_json(name):
    cfg = presets.get(name)
    assert config_lib.from_hf(_hf_config(cfg).to_dict()) == cfg


def _config_presets():
    """(file, preset) for every preset of every config file."""
    for file in sorted((ROOT / "configs").glob("*.py")):
        spec = importlib.util.spec_from_file_location(file.stem, file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for arg in getattr(module, "_MODEL", None) or getattr(module, "_RUNS", None) or presets.names():
            yield file.name, module.get_config(arg), arg


def test_every_config_file_and_preset_loads():
    seen = set()
    for name, config, arg in _config_presets():
        want = presets.get(config.get("model_preset", config.get("preset")))
        if name == "finetune.py":  # the published model at the fine-tuning image size, checkpointed
            want = want.replace(vision=dataclasses.replace(want.vision, image_size=config.model.vision.image_size),
                                remat_policy="full")
        if name == "lora.py":  # the model with adapters
            want = want.replace(lora=presets.from_config_dict(config.model).lora)
            assert want.lora.enabled, arg
        assert presets.from_config_dict(config.model) == want, (name, arg)
        seen.add(name)
    assert {"model.py", "stage1.py", "stage2_opt.py", "stage2_t5.py", "finetune.py", "lora.py"} <= seen


# preset -> (stage, image size, batch, LR, beta2, ViT layer decay, prompt): the paper's Appendix
# Tables 7-9 (spec §9.1)
_FINETUNE = {
    "caption_coco_opt2.7b": ("stage2", 364, 256, 1e-5, 0.999, None, "a photo of"),
    "caption_coco_opt6.7b": ("stage2", 364, 256, 1e-5, 0.999, 0.95, "a photo of"),
    "caption_coco_flant5xl": ("stage2", 364, 256, 1e-5, 0.999, None, "a photo of"),
    "vqa_opt6.7b": ("stage2", 490, 128, 1e-5, 0.999, 0.9, "Question: {} Answer:"),
    "vqa_flant5xl": ("stage2", 490, 128, 1e-5, 0.999, 0.95, "Question: {} Short answer:"),
    "retrieval_coco_vit_g": ("stage1", 364, 224, 1e-5, 0.999, 0.95, ""),
    "retrieval_coco_vit_l": ("stage1", 364, 224, 5e-6, 0.98, None, ""),
}


@pytest.mark.parametrize("arg", sorted(_FINETUNE))
def test_finetune_presets_follow_the_paper_and_train_the_vit(arg):
    spec = importlib.util.spec_from_file_location("finetune", ROOT / "configs" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(arg)
    stage, size, batch, lr, beta2, decay, prompt = _FINETUNE[arg]
    assert (c.stage, c.model.vision.image_size, c.batch_size, c.optim.lr, c.optim.b2, c.optim.layer_decay,
            c.data.prompt) == (stage, size, batch, lr, beta2, decay, prompt)
    assert (c.optim.warmup_steps, c.optim.weight_decay, c.optim.min_lr) == (1000, 0.05, 0.0)
    samples = 658_111 if arg.startswith("vqa") else 566_747  # 5 epochs of VQAv2 train+val / COCO captions
    assert c.total_steps == 5 * -(-samples // batch)
    names = ["vision_model/encoder/layers/mlp/fc1/kernel", "vision_model/embeddings/position_embedding",
             "qformer/encoder/layer/attention/query/kernel", "language_model/model/decoder/layers/fc1/kernel"]
    trains = [partition.is_trainable(n, partition.patterns_for(c.trainable)) for n in names]
    assert trains == [True, True, True, False]


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(KeyError, match="opt2.7b"):
        presets.get("opt-2.7b")


def test_qformer_depth_and_frequency_must_be_positive():
    assert config_lib.QFormerConfig(num_hidden_layers=5, cross_attention_frequency=2).layer_groups == (2, 1)
    assert config_lib.QFormerConfig(num_hidden_layers=1, cross_attention_frequency=3).layer_groups == (0, 1)
    with pytest.raises(ValueError, match=r"cross_attention_frequency \(0\) must both be at least 1"):
        config_lib.QFormerConfig(cross_attention_frequency=0)


def test_the_architecture_registry_answers_for_names_stages_and_weights():
    """One registry (`blip2.ARCHITECTURES`, `STAGES`, `architecture_of`) decides the class everywhere:
    stage 1's model is the retrieval model plus exactly the Q-Former's LM head and `temp` (what
    LAVIS's Blip2Qformer adds to Hugging Face's class), and an unknown name is a user error."""
    tiny, itm = presets.get("tiny"), presets.get("tiny_itm")
    assert blip2.architecture_of(tiny) == blip2.architecture_of(tiny, itg_head=True) == "Blip2ForConditionalGeneration"
    assert blip2.architecture_of(itm) == "Blip2ForImageTextRetrieval"
    assert blip2.architecture_of(itm, itg_head=True) == "Blip2Stage1"
    assert {stage: type(blip2.build(tiny if stage != "stage1" else itm, name)).__name__
            for stage, name in blip2.STAGES.items()} == {"stage1": "Blip2Stage1", "stage2": "Blip2ForConditionalGeneration",
                                                         "lm": "Blip2ForConditionalGeneration"}
    retrieval = traverse_util.flatten_dict(blip2.abstract_params(itm, model=blip2.build(itm)), sep="/")
    stage1 = traverse_util.flatten_dict(blip2.abstract_params(itm, model=blip2.build(itm, "Blip2Stage1")), sep="/")
    assert set(retrieval) < set(stage1)
    assert {p.split("/")[0] for p in set(stage1) - set(retrieval)} == {"cls", "temp"}
    with pytest.raises(KeyError, match="unknown architecture 'Blip2Model'; known: Blip2ForConditionalGeneration, "
                                       "Blip2ForImageTextRetrieval, Blip2Stage1"):
        blip2.build(itm, "Blip2Model")
