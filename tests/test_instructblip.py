"""InstructBLIP against transformers' `InstructBlipForConditionalGeneration` (issue 21 Done-when 1
and 2, the model): tiny perturbed models with a LLaMA (grouped-query attention) and a FlanT5-style
T5; the instruction read by the Q-Former beside the queries, padded; logits to 1e-4; greedy and
beam-search ids equal `generate`'s; the Hugging Face names and config both ways."""

import easy_vqa
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util
from safetensors.numpy import save_file

from blip2_jax.convert import hf_export, lavis
from blip2_jax.data import instructions
from blip2_jax.data.loader import RecordProcessor
from blip2_jax.data.transforms import blip_image_eval
from blip2_jax.generation.api import Blip2Generator
from blip2_jax.generation.config import GenerationConfig
from blip2_jax.generation.decode import generate_fn
from blip2_jax.models import blip2
from blip2_jax.models import config as config_lib
from blip2_jax.objectives import stage2
from blip2_jax.objectives.stage2 import stage2_loss
from blip2_jax.train import loop
from blip2_jax.weights.hf_checkpoint import params_from_state_dict
from blip2_jax.weights import load as weights
from blip2_jax.weights.hf_names import to_hf
from blip2_jax.weights.model_checkpoint import CheckpointParams
from tests.reference import hf_models as ref
from tests.reference.tokenizers import tiny_opt_tokenizer
from tests.test_train import assert_resumes_exactly, load_config

Q, IMAGE = ref.NUM_QUERY_TOKENS, ref.IMAGE_TOKEN_INDEX
# a symmetric T5: transformers 5's generate sizes the decoder's cache by the encoder's depth
TEXT = {"llama": ref.LLAMA, "t5": dict(ref.T5, num_decoder_layers=2)}


def instructblip(text: dict, seed: int = 0) -> transformers.InstructBlipForConditionalGeneration:
    torch.manual_seed(seed)
    config = transformers.InstructBlipConfig(vision_config=dict(ref.VISION), qformer_config=dict(ref.QFORMER),
                                             text_config=dict(text), num_query_tokens=Q, image_token_index=IMAGE)
    model = transformers.InstructBlipForConditionalGeneration(config)
    if text["model_type"] == "t5":
        ref.untie_t5_head(model)
    return ref.perturb(model, seed)


@pytest.fixture(scope="module", params=["llama", "t5"])
def pair(request):
    hf = instructblip(TEXT[request.param], seed=6)
    cfg = config_lib.from_hf(hf.config.to_dict())
    return dict(kind=request.param, hf=hf, cfg=cfg, params=params_from_state_dict(ref.state_dict(hf), cfg))


def test_the_config_reads_as_an_instruction_aware_blip2(pair):
    cfg = pair["cfg"]
    assert cfg.instruction_aware and cfg.qformer.use_qformer_text_input
    assert blip2.architecture_of(cfg) == "InstructBlipForConditionalGeneration"
    assert type(blip2.build(cfg)).__name__ == "InstructBlipForConditionalGeneration"
    back = config_lib.to_hf(cfg)
    assert back["model_type"] == "instructblip" and back["architectures"] == ["InstructBlipForConditionalGeneration"]
    assert config_lib.from_hf(transformers.InstructBlipConfig(**back).to_dict()) == cfg


def test_logits_equal_transformers_with_padded_instructions(pair):
    """Instructions of 7, 3 and 5 Q-Former tokens (right-padded); LLM prompts right-padded after the
    image tokens (transformers' forward counts LLaMA positions from 0, ours from the mask: the same
    on real tokens); T5 decodes a padded target."""
    text = TEXT[pair["kind"]]
    qids, qmask = ref.padded_text([7, 3, 5], 7, ref.QFORMER["vocab_size"], seed=1)
    tids, tmask = ref.padded_text([4, 6, 2], 6, text["vocab_size"], avoid=(IMAGE,), seed=2)
    image = np.full((3, Q), IMAGE)
    ids, mask = np.concatenate([image, tids], 1), np.concatenate([np.ones_like(image), tmask], 1)
    pixels = ref.pixels(3, seed=3)
    extra, hf_extra = {}, {}
    if pair["kind"] == "t5":
        dec, dmask = ref.padded_text([3, 5, 4], 5, text["vocab_size"], seed=4)
        extra = dict(decoder_input_ids=jnp.asarray(dec), decoder_attention_mask=jnp.asarray(dmask))
        hf_extra = dict(decoder_input_ids=torch.tensor(dec), decoder_attention_mask=torch.tensor(dmask))
    got = blip2.build(pair["cfg"]).apply({"params": pair["params"]}, jnp.asarray(ref.nhwc(pixels)),
                                         jnp.asarray(qids), jnp.asarray(qmask), jnp.asarray(ids), jnp.asarray(mask),
                                         **extra)
    with torch.no_grad():
        want = pair["hf"](pixel_values=torch.tensor(pixels), qformer_input_ids=torch.tensor(qids),
                          qformer_attention_mask=torch.tensor(qmask), input_ids=torch.tensor(ids),
                          attention_mask=torch.tensor(mask), **hf_extra).logits.numpy()
    valid = (dmask if pair["kind"] == "t5" else mask).astype(bool)
    assert np.abs(np.asarray(got.logits) - want)[valid].max() <= 1e-4
    # the instruction is read: another instruction gives other logits
    other = blip2.build(pair["cfg"]).apply({"params": pair["params"]}, jnp.asarray(ref.nhwc(pixels)),
                                           jnp.asarray((qids + 1) * qmask), jnp.asarray(qmask), jnp.asarray(ids),
                                           jnp.asarray(mask), **extra)
    assert np.abs(np.asarray(other.logits) - np.asarray(got.logits))[valid].max() > 1e-3


def test_names_round_trip_bit_for_bit(pair):
    state = ref.state_dict(pair["hf"])
    back = dict(to_hf(pair["params"], qformer_group=pair["cfg"].qformer.cross_attention_frequency))
    tied = {f"language_model.{part}.embed_tokens.weight" for part in ("encoder", "decoder")}  # T5: = shared
    assert back.keys() <= state.keys() and state.keys() - back.keys() <= tied
    for name, value in back.items():
        np.testing.assert_array_equal(value, state[name], err_msg=name)


@pytest.mark.parametrize("settings", [dict(num_beams=1, repetition_penalty=1.3, min_new_tokens=2),
                                      dict(num_beams=3, length_penalty=0.7, min_new_tokens=2)],
                         ids=["greedy_repetition", "beam3"])
def test_generation_equals_transformers_generate(pair, settings):
    """Our jitted search (`generate_fn` with the instruction) against `generate`: the same ids for a
    padded batch of instructions and prompts (decoder-only prompts left-padded, T5's right)."""
    text, decoder_only = TEXT[pair["kind"]], pair["kind"] != "t5"
    eos = 98 if decoder_only else 86  # frequent ids of these tiny models, so beams finish early too
    qids, qmask = ref.padded_text([5, 2], 5, ref.QFORMER["vocab_size"], seed=5)
    tids, tmask = ref.padded_text([3, 1], 3, text["vocab_size"], left=decoder_only, avoid=(IMAGE,), seed=6,
                                  first=text["bos_token_id"] if decoder_only else None)
    tids = np.where(tmask == 1, tids, text["pad_token_id"])
    image = np.full((2, Q), IMAGE)
    ids, mask = np.concatenate([image, tids], 1), np.concatenate([np.ones_like(image), tmask], 1)
    pixels = ref.pixels(2, seed=7)
    cfg = GenerationConfig(max_new_tokens=8, eos_token_id=eos, **settings)
    out = generate_fn(blip2.build(pair["cfg"]), cfg)(
        pair["params"], jnp.asarray(ref.nhwc(pixels)), jnp.asarray(ids), jnp.asarray(mask),
        qformer_input_ids=jnp.asarray(qids), qformer_attention_mask=jnp.asarray(qmask))
    with torch.no_grad():
        theirs = pair["hf"].generate(pixel_values=torch.tensor(pixels), qformer_input_ids=torch.tensor(qids),
                                     qformer_attention_mask=torch.tensor(qmask), input_ids=torch.tensor(ids),
                                     attention_mask=torch.tensor(mask), do_sample=False, max_new_tokens=8,
                                     eos_token_id=eos, pad_token_id=text["pad_token_id"], **settings).numpy()
    theirs = theirs[:, ids.shape[1]:] if decoder_only else theirs[:, 1:]
    ours = np.asarray(out.tokens)[:, 0]

    def cut(rows):
        return [r[:r.index(eos) + 1] if eos in r else r for r in rows.tolist()]

    assert cut(ours) == cut(theirs)


def test_a_hugging_face_directory_converts_both_ways_with_its_processor(tmp_path):
    """HF InstructBLIP directory (weights, config, InstructBlipProcessor with its Q-Former tokenizer)
    -> model checkpoint -> HF directory: every tensor bit for bit, nothing missing, and the processor
    (both tokenizers) loads again and encodes as before; `weights.load` reads the directory too."""
    hf = instructblip(ref.LLAMA, seed=8)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "what", "is", "this", "?"]))
    qformer_tok = transformers.BertTokenizerFast(str(vocab))
    image_processor = transformers.BlipImageProcessorPil(size={"height": 30, "width": 30})
    transformers.InstructBlipProcessor(image_processor, tiny_opt_tokenizer(), qformer_tok,
                                       num_query_tokens=Q).save_pretrained(tmp_path / "hf")
    hf.save_pretrained(tmp_path / "hf")
    ours = hf_export.from_hf(tmp_path / "hf", tmp_path / "ours")
    assert ours.architecture == "InstructBlipForConditionalGeneration"
    hf_export.to_hf(tmp_path / "ours", tmp_path / "back")
    back, info = transformers.InstructBlipForConditionalGeneration.from_pretrained(tmp_path / "back",
                                                                                   output_loading_info=True)
    assert not any(info.values()), info
    original, written = ref.state_dict(hf), ref.state_dict(back)
    assert written.keys() == original.keys()
    for name, value in original.items():
        np.testing.assert_array_equal(written[name], value, err_msg=name)
    processor = transformers.InstructBlipProcessor.from_pretrained(tmp_path / "back")
    assert processor.qformer_tokenizer("what is this ?")["input_ids"] == qformer_tok("what is this ?")["input_ids"]
    loaded = weights.load(tmp_path / "hf")
    assert loaded.architecture == "InstructBlipForConditionalGeneration"
    np.testing.assert_array_equal(np.asarray(loaded.params["query_tokens"]), original["query_tokens"])


# transformers' conversion of LAVIS's InstructBLIP files, HF -> LAVIS (first match), written
# independently of weights/lavis_names.py
_LAVIS = [("vision_model.embeddings.class_embedding", "visual_encoder.cls_token"),
          ("vision_model.embeddings.position_embedding", "visual_encoder.pos_embed"),
          ("vision_model.embeddings.patch_embedding", "visual_encoder.patch_embed.proj"),
          ("vision_model.encoder.layers.", "visual_encoder.blocks."), ("vision_model.post_layernorm", "ln_vision"),
          ("qformer.embeddings.layernorm", "Qformer.bert.embeddings.LayerNorm"), ("qformer.", "Qformer.bert."),
          ("language_projection", "llm_proj"), ("language_model.", "llm_model."), ("query_tokens", "query_tokens")]


def test_a_lavis_instruct_checkpoint_imports_to_the_models_parameters(tmp_path):
    """`blip2_vicuna_instruct` as LAVIS saves it (trainable parts only: the Q-Former with its text
    embeddings, the queries, llm_proj; ViT and Vicuna from their own files, Vicuna one row short of
    the [PAD] the model adds) -> the HF model's parameters it was cut from (padded row zero)."""
    hf = instructblip(ref.LLAMA, seed=9)
    cfg = config_lib.from_hf(hf.config.to_dict())
    state = {}
    for name, value in ref.state_dict(hf).items():
        old, new = next((o, n) for o, n in _LAVIS if name.startswith(o))
        name = (new + name[len(old):]).replace("attention.attention.", "attention.self.").replace(
            "layer_norm", "norm").replace("self_attn.projection", "attn.proj").replace("self_attn.qkv", "attn.qkv")
        if name.endswith("attn.qkv.bias"):
            d = value.shape[0] // 3
            state[name.replace("qkv.bias", "q_bias")] = value[:d]
            state[name.replace("qkv.bias", "v_bias")] = value[2 * d:]
        else:
            state[name] = value
    vit = {k[len("visual_encoder."):]: torch.from_numpy(np.array(state.pop(k))) for k in list(state)
           if k.startswith("visual_encoder.")}
    llm = {k[len("llm_model."):]: state.pop(k) for k in list(state) if k.startswith("llm_model.")}
    rows = cfg.text.vocab_size - 1
    llm = {k: v[:rows] if k in ("model.embed_tokens.weight", "lm_head.weight") else v for k, v in llm.items()}
    torch.save({"model": {k: torch.from_numpy(np.array(v)) for k, v in state.items()}}, tmp_path / "instruct.pth")
    torch.save(vit, tmp_path / "eva_vit_g.pth")
    (tmp_path / "vicuna").mkdir()
    save_file({k: np.ascontiguousarray(v) for k, v in llm.items()}, tmp_path / "vicuna" / "model.safetensors")
    (tmp_path / "vicuna" / "config.json").write_text(hf.config.text_config.to_json_string())
    ours, notes = lavis.from_lavis(tmp_path / "instruct.pth", tmp_path / "ours", cfg, vision=tmp_path / "eva_vit_g.pth",
                                   text=tmp_path / "vicuna")
    assert ours.architecture == "InstructBlipForConditionalGeneration"
    assert sum(f"from {rows} to {cfg.text.vocab_size} rows" in n for n in notes) == 2
    want = traverse_util.flatten_dict(params_from_state_dict(ref.state_dict(hf), cfg), sep="/")
    got = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(ours.tree(), sep="/").items()}
    assert got.keys() == want.keys()
    for path, value in want.items():
        if path in ("language_model/model/embed_tokens/embedding", "language_model/lm_head/kernel"):
            row_axis = 0 if "embed" in path else 1
            np.testing.assert_array_equal(np.take(got[path], range(rows), axis=row_axis),
                                          np.take(value, range(rows), axis=row_axis))
            assert not np.take(got[path], [rows], axis=row_axis).any()
        elif path.endswith("qkv/bias"):  # LAVIS has no key bias: zero there
            d = value.shape[-1] // 3
            np.testing.assert_array_equal(got[path][..., d:2 * d], 0)
        else:
            np.testing.assert_array_equal(got[path], value, err_msg=path)


def test_the_instruction_tuning_loss_is_transformers_loss():
    """Stage 2 of an instruction-aware model (configs/instruct.py): the LM loss with the instruction
    through the Q-Former equals transformers' loss with the queries' labels ignored."""
    hf = instructblip(ref.LLAMA, seed=10)
    cfg = config_lib.from_hf(hf.config.to_dict())
    params = params_from_state_dict(ref.state_dict(hf), cfg)
    qids, qmask = ref.padded_text([6, 3], 6, ref.QFORMER["vocab_size"], seed=11)
    text, tmask = ref.padded_text([5, 3], 5, ref.LLAMA["vocab_size"], avoid=(IMAGE,), seed=12)
    labels = np.where(tmask == 1, text, -100)
    labels[:, :2] = -100  # the instruction part of the LLM's text is no target
    pixels = ref.pixels(2, seed=13)
    batch = {"image": ref.nhwc(pixels), "text_ids": text, "text_mask": tmask, "labels": labels, "qformer_ids": qids,
             "qformer_mask": qmask}
    loss, _ = stage2_loss(params, {k: jnp.asarray(v) for k, v in batch.items()}, jax.random.PRNGKey(0),
                          model=blip2.build(cfg), deterministic=True)
    image = np.full((2, Q), IMAGE)  # transformers holds the queries at <image> tokens, first
    with torch.no_grad():
        want = hf(pixel_values=torch.tensor(pixels), qformer_input_ids=torch.tensor(qids),
                  qformer_attention_mask=torch.tensor(qmask), input_ids=torch.tensor(np.concatenate([image, text], 1)),
                  attention_mask=torch.tensor(np.concatenate([np.ones_like(image), tmask], 1)),
                  labels=torch.tensor(np.concatenate([np.full_like(image, -100), labels], 1))).loss
    assert float(loss) == pytest.approx(float(want), rel=1e-5)


@pytest.mark.slow  # compiles the tiny instruction-tuning step: ~40 s on 2 cores
def test_the_instruct_preset_trains_resumes_and_answers_as_transformers_after_export(tmp_path):
    """`configs/instruct.py:tiny` through the real trainer: the checkpoint is an InstructBLIP, the
    Q-Former's instruction embeddings and the queries moved (the instruction is in the gradient),
    the ViT and the LLM did not; a run killed after step 2 continues exactly; `to_hf` of the run
    loads in transformers with nothing missing and answers as our generator does on the workdir."""
    config = load_config("configs/instruct.py", "tiny")
    config.total_steps, config.optim.warmup_steps = 3, 1
    config.mesh.update(num_devices=1, data=1)
    config.checkpoint.update(every=1, async_save=False)
    config.log.tensorboard = False
    run = tmp_path / "run"
    loop.train(config, run)
    first = CheckpointParams.open(run / "checkpoints" / "1")
    last = CheckpointParams.open(run)
    assert last.architecture == "InstructBlipForConditionalGeneration" and last.source.endswith("step 3")
    a = traverse_util.flatten_dict(first.tree(), sep="/")
    b = traverse_util.flatten_dict(last.tree(), sep="/")
    moved = {p for p in a if not np.array_equal(a[p], b[p])}
    assert {"qformer/embeddings/word_embeddings/embedding", "query_tokens", "language_projection/kernel"} <= moved
    assert not any(p.startswith(("language_model/", "vision_model/encoder")) for p in moved)

    assert_resumes_exactly(config, run, tmp_path / "resumed", 3)

    tokenizers = tmp_path / "tokenizers"  # the LLM's, and the Q-Former's in its processor subfolder
    tiny_opt_tokenizer().save_pretrained(tokenizers)
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "vocab.txt").write_text("\n".join(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(last.config.qformer.vocab_size - 6)]))
    bert = transformers.BertTokenizerFast(str(tmp_path / "bert" / "vocab.txt"))
    bert.save_pretrained(tokenizers / "qformer_tokenizer")
    hf_export.to_hf(run, tmp_path / "hf", tokenizer=str(tokenizers))
    hf, info = transformers.InstructBlipForConditionalGeneration.from_pretrained(tmp_path / "hf",
                                                                                output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    processor = transformers.InstructBlipProcessor.from_pretrained(tmp_path / "hf")
    processor.tokenizer.padding_side = "left"
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    prompts = ["what is w3 ?", "w7 w8", "Question : what is the w1 ? Answer :"]
    search = GenerationConfig(num_beams=3, max_new_tokens=5, min_new_tokens=2)
    generator = Blip2Generator.from_pretrained(run, tokenizer=str(tokenizers), batch_size=4)
    ours = generator.generate(images, prompts, search)
    theirs = transformers_texts(hf, processor, images, prompts, num_beams=3, max_new_tokens=5, min_new_tokens=2)
    assert ours == theirs and sum(map(bool, ours)) >= 2  # the third draws special tokens only, in both


def test_an_instruction_record_is_tokenised_as_lavis_does(tmp_path):
    """A VQA record for InstructBLIP-Vicuna (`stage2_llama` with an instruction): the LLM text is
    BOS + instruction, then the answer + EOS without a BOS of its own, right-padded, the instruction
    no target (LAVIS `concat_text_input_output`); the instruction also reaches the Q-Former in its
    BERT vocabulary ([CLS] ... [SEP], cut from the left), all as the batch spec says."""
    llm = tiny_opt_tokenizer()  # prepends BOS and has an EOS, as LAVIS's LLaMA tokenizer
    llm.save_pretrained(tmp_path / "llm")
    (tmp_path / "bert").mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "question", ":", "what", "is", "the", "w3", "?", "answer"]
    (tmp_path / "bert" / "vocab.txt").write_text("\n".join(words))
    spec = stage2.batch_spec(32, 12, "llama", instruction_length=6)
    process = RecordProcessor("stage2_llama", spec, blip_image_eval(32), str(tmp_path / "llm"), 12,
                              prompt="Question: {} Answer:", instruction_tokenizer_path=str(tmp_path / "bert"),
                              instruction_length=6)
    image = sorted(easy_vqa.get_train_image_paths().values())[0]
    row = process({"id": "q", "image": image, "question": "What is the w3?", "answer": ["w5"]},
                  np.random.default_rng(0))
    assert set(row) == set(spec)
    full = llm("Question: what is the w3 ? Answer:")["input_ids"]  # pre_question's form, BOS first
    instruction = [full[0]] + full[len(full) - 5:]  # cut from the left to 6, as the Q-Former's (LAVIS max_txt_len)
    answer = llm("w5</s>")["input_ids"][1:]
    n = len(instruction) + len(answer)
    assert row["text_ids"][:n].tolist() == instruction + answer and row["text_mask"].sum() == n
    assert answer[-1] == llm.eos_token_id
    assert row["labels"][:len(instruction)].tolist() == [-100] * len(instruction)
    assert row["labels"][len(instruction):n].tolist() == answer and (row["labels"][n:] == -100).all()
    bert = transformers.BertTokenizerFast(str(tmp_path / "bert" / "vocab.txt"))
    words = bert("Question: what is the w3 ? Answer:")["input_ids"]  # longer than 6: its start is cut
    assert row["qformer_ids"].tolist() == [words[0]] + words[len(words) - 5:]
    assert row["qformer_mask"].tolist() == [1] * 6


def instructblip_directory(path, seed: int = 14):
    """A tiny InstructBLIP-LLaMA saved as a Hugging Face directory with its processor (both tokenizers,
    the Q-Former's in `qformer_tokenizer/`) -> (the transformers model, its processor)."""
    hf = instructblip(ref.LLAMA, seed=seed)
    vocab = path.parent / f"{path.name}_vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "what", "is", "this", "?", "a", "w1",
                                "w2", "ocr", "tokens", "question", "short", "answer", ":", "."]))
    processor = transformers.InstructBlipProcessor(
        transformers.BlipImageProcessorPil(size={"height": 30, "width": 30}), tiny_opt_tokenizer(),
        transformers.BertTokenizerFast(str(vocab), truncation_side="left"), num_query_tokens=Q)
    processor.save_pretrained(path)
    hf.save_pretrained(path)
    processor.tokenizer.padding_side = "left"
    return hf, processor


def transformers_texts(hf, processor, images, prompts, qformer_prompts=None, **search) -> list[str]:
    """transformers' processor + generate, the instruction (default: the prompts) to the Q-Former."""
    from PIL import Image  # pylint: disable=import-outside-toplevel

    inputs = processor(images=[Image.fromarray(i) for i in images], text=prompts, return_tensors="pt", padding=True)
    if qformer_prompts is not None:
        q = processor.qformer_tokenizer(qformer_prompts, return_tensors="pt", padding=True)
        inputs["qformer_input_ids"], inputs["qformer_attention_mask"] = q["input_ids"], q["attention_mask"]
    with torch.no_grad():
        out = hf.generate(**inputs, do_sample=False, **search)
    texts = processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [t.strip() for t in texts]


def test_the_generator_reads_an_instructblip_directory_as_transformers_does(tmp_path):
    """`Blip2Generator.from_pretrained` on an InstructBLIP directory (both tokenizers beside the
    weights, as InstructBlipProcessor saves them): the prompt reaches the Q-Former and the LLM, and
    beam search gives the text transformers' processor + generate give."""
    hf, processor = instructblip_directory(tmp_path / "hf")
    image = np.random.default_rng(0).integers(0, 256, (30, 30, 3), dtype=np.uint8)
    prompts = ["what is this ?", "a photo of"]
    generator = Blip2Generator.from_pretrained(tmp_path / "hf", batch_size=2)
    cfg = GenerationConfig(num_beams=3, max_new_tokens=6, semantics="transformers", min_length=0)
    ours = generator.generate([image, image[::-1]], prompts, cfg)
    theirs = transformers_texts(hf, processor, [image, image[::-1]], prompts, num_beams=3, max_new_tokens=6)
    assert ours == theirs and all(ours)  # words, not an empty text


def test_the_paper_templates_phrase_each_task_and_are_drawn_per_record():
    """`instruction_texts`: a VQA record's instruction is one of the paper's ten VQA templates around
    its question (LAVIS's question form), the target its first answer; a caption record's one of the
    thirteen caption templates; a record tagged 'vqg' asks for the question behind the answer. Every
    template is drawn over many records, and the same generator state draws the same one (resume)."""
    vqa = {"id": "q", "question": "What Color is the shape?", "answer": ["Red", "red"]}
    drawn = {instructions.instruction_texts(vqa, np.random.default_rng(s)) for s in range(300)}
    assert drawn == {(t.format("what color is the shape?"), "red") for t in instructions.VQA}
    caption = {"id": "c", "caption": "A red Circle."}
    drawn = {instructions.instruction_texts(caption, np.random.default_rng(s)) for s in range(300)}
    assert drawn == {(t, "a red circle") for t in instructions.CAPTION}
    vqg = {**vqa, "task": "vqg"}
    drawn = {instructions.instruction_texts(vqg, np.random.default_rng(s)) for s in range(300)}
    assert drawn == {(t.format("red"), "what color is the shape?") for t in instructions.VQG}
    assert len(instructions.VQA) == 10 and len(instructions.CAPTION) == 13 and len(instructions.VQG) == 6
    assert (instructions.instruction_texts(vqa, np.random.default_rng(7))
            == instructions.instruction_texts(vqa, np.random.default_rng(7)))
    with pytest.raises(KeyError, match="task 'ocr' is not one of"):
        instructions.instruction_texts({**vqa, "task": "ocr"}, np.random.default_rng(0))


def test_templated_records_reach_the_llm_and_the_qformer_alike(tmp_path):
    """RecordProcessor with data.templates='instructblip': the LLM's instruction tokens and the
    Q-Former's are the same drawn template, the answer alone is the target."""
    llm = tiny_opt_tokenizer()
    llm.save_pretrained(tmp_path / "llm")
    (tmp_path / "bert").mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "question", ":", "what", "is", "the", "w3", "?", "q", "a"]
    (tmp_path / "bert" / "vocab.txt").write_text("\n".join(words))
    spec = stage2.batch_spec(32, 48, "llama", instruction_length=40)
    process = RecordProcessor("stage2_llama", spec, blip_image_eval(32), str(tmp_path / "llm"), 48,
                              instruction_tokenizer_path=str(tmp_path / "bert"), instruction_length=40,
                              templates="instructblip")
    image = sorted(easy_vqa.get_train_image_paths().values())[0]
    record = {"id": "q", "image": image, "question": "What is the w3?", "answer": ["w5"]}
    bert = transformers.BertTokenizerFast(str(tmp_path / "bert" / "vocab.txt"))
    for seed in range(4):
        row = process(record, np.random.default_rng(seed))
        instruction, answer = instructions.instruction_texts(record, np.random.default_rng(seed))
        full = llm(instruction)["input_ids"]
        target = llm(answer + "</s>")["input_ids"][1:]
        n = len(full) + len(target)
        assert row["text_ids"][:n].tolist() == full + target
        assert row["labels"][:len(full)].tolist() == [-100] * len(full)
        assert row["labels"][len(full):n].tolist() == target
        want = bert(instruction)["input_ids"]
        assert row["qformer_ids"][:len(want)].tolist() == want and row["qformer_mask"].sum() == len(want)


def test_eval_preset_gives_an_instructblip_the_instruction_as_transformers_does(tmp_path, blip2_jax):
    """`blip2-jax eval` with the TextVQA preset on an InstructBLIP directory: each prompt (the
    question's OCR tokens and the question) reaches the Q-Former and the LLM, and the answers equal
    transformers' processor + generate on those prompts (transformers' decoding rules set by
    override, as that is what transformers runs); the instruction changes what is answered."""
    import json  # pylint: disable=import-outside-toplevel
    from PIL import Image  # pylint: disable=import-outside-toplevel

    hf, processor = instructblip_directory(tmp_path / "hf", seed=15)
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (30, 30, 3), dtype=np.uint8) for _ in range(3)]
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    records = [{"question_id": i, "image": f"{i}.png", "question": q, "answer": ["w1"] * 10, "ocr_tokens": ocr}
               for i, (q, ocr) in enumerate([("What is this?", ["w1", "w2"]), ("what is a w2", []),
                                              ("is this w1?", ["a", "w2", "w1"])])]
    (tmp_path / "textvqa.json").write_text(json.dumps(records))
    code, out, err = blip2_jax(
        "eval", "--config", "configs/eval/instruct.py:textvqa_vicuna7b", "--checkpoint", str(tmp_path / "hf"),
        "--out", str(tmp_path / "eval"), f"--config.data.annotations={tmp_path / 'textvqa.json'}",
        f"--config.data.image_root={tmp_path}", "--config.num_devices=1", "--config.batch_size=2",
        "--config.generation.semantics=transformers", "--config.generation.min_length=0",
        "--config.generation.length_penalty=1.0", "--config.generation.max_new_tokens=5")
    assert code == 0, err
    ours = [r["answer"] for r in json.loads((tmp_path / "eval" / "results.json").read_text())]
    prompts = ["OCR tokens: w1, w2. Question: what is this? Short answer:",
               "OCR tokens: . Question: what is a w2 Short answer:",
               "OCR tokens: a, w2, w1. Question: is this w1? Short answer:"]
    theirs = transformers_texts(hf, processor, images, prompts, num_beams=5, max_new_tokens=5)
    assert ours == theirs and all(ours)
    other = transformers_texts(hf, processor, images, prompts, ["a"] * 3, num_beams=5, max_new_tokens=5)
    assert other != theirs  # the Q-Former's instruction matters: a test that passes it is not vacuous


def test_scienceqa_preset_ranks_candidates_by_transformers_likelihood(tmp_path, blip2_jax):
    """`blip2-jax eval` with the ScienceQA preset (multiple choice by ranking) on an InstructBLIP
    directory: each candidate's score is its summed NLL under transformers' InstructBLIP (the prompt
    with context and choices to the Q-Former and the LLM, the candidate + EOS the target), and the
    pick is the lowest; the accuracy counts the picks that are the answer."""
    import json  # pylint: disable=import-outside-toplevel
    from PIL import Image  # pylint: disable=import-outside-toplevel

    from blip2_jax.evaluate.run import choice_prompt  # pylint: disable=import-outside-toplevel

    hf, processor = instructblip_directory(tmp_path / "hf", seed=16)
    rng = np.random.default_rng(4)
    records = [dict(question_id=0, question="what is this?", choices=["w1", "a w2", "w3 w4 w5"], answer=2,
                    context="w6 w7"),
               dict(question_id=1, question="is this a w1?", choices=["w8", "w9"], answer=0),
               dict(question_id=2, question="what is a w2", choices=["a", "w1 w1", "w2", "w10"], answer=3,
                    context="")]
    for r in records:
        r["image"] = f"{r['question_id']}.png"
        Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(tmp_path / r["image"])
    (tmp_path / "sqa.json").write_text(json.dumps(records))
    code, _, err = blip2_jax(
        "eval", "--config", "configs/eval/instruct.py:scienceqa_vicuna7b", "--checkpoint", str(tmp_path / "hf"),
        "--out", str(tmp_path / "eval"), f"--config.data.annotations={tmp_path / 'sqa.json'}",
        f"--config.data.image_root={tmp_path}", "--config.num_devices=1", "--config.batch_size=3")
    assert code == 0, err
    ours = json.loads((tmp_path / "eval" / "results.json").read_text())
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())

    tokenizer, qtok = processor.tokenizer, processor.qformer_tokenizer
    picks = []
    for r, result in zip(records, ours):
        prompt = choice_prompt("Question: {} Options: {}. Answer:", r["question"], r["choices"], r.get("context", ""))
        image = processor.image_processor(Image.open(tmp_path / r["image"]), return_tensors="pt")["pixel_values"]
        want = []
        for choice in r["choices"]:
            prompt_ids = tokenizer(prompt)["input_ids"]  # BOS + prompt
            target = tokenizer(choice)["input_ids"][1:] + [tokenizer.eos_token_id]  # no BOS, EOS after
            ids = torch.tensor([[IMAGE] * Q + prompt_ids + target])
            q = qtok(prompt, return_tensors="pt")
            with torch.no_grad():
                logits = hf(pixel_values=image, qformer_input_ids=q["input_ids"],
                            qformer_attention_mask=q["attention_mask"], input_ids=ids,
                            attention_mask=torch.ones_like(ids)).logits[0].double()
            logp = torch.log_softmax(logits[:-1], -1)[torch.arange(ids.shape[1] - 1), ids[0, 1:]]
            want.append(-float(logp[-len(target):].sum()))
        np.testing.assert_allclose(result["scores"], want, rtol=1e-4)
        assert result["answer"] == int(np.argmin(want))
        picks.append(result["answer"])
    assert metrics["accuracy"] == pytest.approx(np.mean([p == r["answer"] for p, r in zip(picks, records)]))
    assert len({round(s, 3) for r in ours for s in r["scores"]}) == 9  # the candidates' scores all differ


def test_candidate_scores_equal_transformers_for_both_llm_kinds(pair, tmp_path):
    """`evaluate.choice.candidate_nll` (the ranking score) for LLaMA and T5 InstructBLIPs: each
    candidate's summed NLL as transformers' model gives it (T5: the prompt + </s> to the encoder,
    the candidate + </s> the decoder's labels; LLaMA: BOS + prompt, then the candidate + EOS)."""
    from blip2_jax.data.images import preprocess_images  # pylint: disable=import-outside-toplevel
    from blip2_jax.evaluate.choice import candidate_nll  # pylint: disable=import-outside-toplevel
    from blip2_jax.evaluate.model import EvalModel  # pylint: disable=import-outside-toplevel
    from blip2_jax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
    from tests.test_convert import _t5_tokenizer  # pylint: disable=import-outside-toplevel

    t5 = pair["kind"] == "t5"
    tokenizer = _t5_tokenizer() if t5 else tiny_opt_tokenizer()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(20)]
    (tmp_path / "vocab.txt").write_text("\n".join(words))
    qtok = transformers.BertTokenizerFast(str(tmp_path / "vocab.txt"))
    mesh = mesh_lib.make_mesh(-1, 1, 1, jax.devices()[:1])
    model = EvalModel(blip2.build(pair["cfg"]), pair["cfg"], pair["params"], "")
    pixels = ref.nhwc(ref.pixels(2, seed=7))
    images = [np.clip(p * 60 + 128, 0, 255).astype(np.uint8) for p in pixels]
    prompts, candidates = ["w1 w2 w3", "w4"], [["w5", "w6 w7 w8", "a"], ["w9 w9"]]
    ours = candidate_nll(model, mesh, images, prompts, candidates, tokenizer, batch_size=2, qformer_tokenizer=qtok)

    x = torch.tensor(np.transpose(preprocess_images(images, pair["cfg"].vision.image_size), (0, 3, 1, 2)))
    for i, options in enumerate(candidates):
        q = qtok(prompts[i], return_tensors="pt")
        want = []
        for c in options:
            prompt = tokenizer(prompts[i])["input_ids"]
            target = tokenizer(c)["input_ids"] if t5 else tokenizer(c)["input_ids"][1:] + [tokenizer.eos_token_id]
            with torch.no_grad():
                if t5:
                    ids = torch.tensor([[IMAGE] * Q + prompt])
                    out = pair["hf"](pixel_values=x[i:i + 1], qformer_input_ids=q["input_ids"],
                                     qformer_attention_mask=q["attention_mask"], input_ids=ids,
                                     attention_mask=torch.ones_like(ids), labels=torch.tensor([target]))
                    logp = torch.log_softmax(out.logits[0].double(), -1)[torch.arange(len(target)), target]
                else:
                    ids = torch.tensor([[IMAGE] * Q + prompt + target])
                    logits = pair["hf"](pixel_values=x[i:i + 1], qformer_input_ids=q["input_ids"],
                                        qformer_attention_mask=q["attention_mask"], input_ids=ids,
                                        attention_mask=torch.ones_like(ids)).logits[0].double()
                    logp = torch.log_softmax(logits[:-1], -1)[torch.arange(ids.shape[1] - 1), ids[0, 1:]]
                    logp = logp[-len(target):]
            want.append(-float(logp.sum()))
        np.testing.assert_allclose(ours[i], want, rtol=1e-4)


@pytest.mark.parametrize("record,expected", [
    (dict(question_id=0, image="0.png", question="q", choices=["a"], answer=0),
     "record 0: 'choices' must be a list of two or more texts, got ['a']"),
    (dict(question_id=0, image="0.png", question="q", choices=["a", "b"], answer=2),
     "record 0: 'answer' must be the index of the right choice (0..1), got 2"),
    (dict(question_id=0, image="0.png", choices=["a", "b"], answer=0), "record 0 has none of ['question']"),
])
def test_a_bad_multiple_choice_record_is_named_before_the_model_loads(tmp_path, blip2_jax, record, expected):
    """The checkpoint does not exist: the record's error comes first (the set is read before the
    model), as one line with exit 2, and nothing is written."""
    import json  # pylint: disable=import-outside-toplevel
    from tests.test_cli_errors import user_error  # pylint: disable=import-outside-toplevel

    (tmp_path / "sqa.json").write_text(json.dumps([record]))
    code, _, err = blip2_jax("eval", "--config", "configs/eval/instruct.py:scienceqa_vicuna7b", "--checkpoint",
                             str(tmp_path / "no_model"), "--out", str(tmp_path / "eval"),
                             f"--config.data.annotations={tmp_path / 'sqa.json'}")
    assert expected in user_error(code, err)
    assert not (tmp_path / "eval").exists()
