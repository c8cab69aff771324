"""Token ids from LAVIS's own `Blip2OPT`/`Blip2T5` `generate` and `predict_answers` on tiny random
BLIP-2 models: the fixtures of tests/test_generation_lavis.py (tests/fixtures/lavis_generate/).

LAVIS's model files are read from a LAVIS git clone at the two commits and imported unmodified;
only what generation does not touch is stubbed (the model registry, download/distributed helpers,
the EVA/CLIP ViT factories). The towers are Hugging Face's Blip2 vision model and Q-Former (4.33),
wired in as LAVIS's `visual_encoder`/`Qformer.bert`, so that the weights load into blip2_jax with its
Hugging Face converter; a word-level stub tokenizer gives fixed ids and records the ids LAVIS decodes.
Each LM's EOS row is made louder (`EOS`) so that sequences end at varied steps, right where LAVIS's
and `transformers`' minimum lengths differ, and some caption beams end on EOS while others are cut
off: the `transformers` rules give other ids than LAVIS in every case, OPT and T5.

- `head`: LAVIS@HEAD (506965b9c4a18c1e565bd32acaccabe0198433f7, requirements pin transformers==4.33.2):
  builds the models (fixed seeds), writes weights, config, images and the Q-Former outputs, and runs
  Blip2OPT/Blip2T5 `generate` and `predict_answers`. The OPT is transformers' OPTForCausalLM (as at
  HEAD), the T5 LAVIS's vendored `modeling_t5` with exact GELU.
- `paper`: LAVIS@85907dd28e144cfff6844be1dac4bfe708978c9f (the paper-era code, requirements pin
  transformers>=4.25,<4.27; its vendored `modeling_opt` takes `query_embeds`), on the same weights.
  transformers 4.26 has no Blip2, so its towers replay the Q-Former outputs `head` wrote.

Regenerate (about a minute on a CPU):

  git clone https://github.com/salesforce/LAVIS /tmp/LAVIS
  python3.11 -m venv /tmp/lavis-venv && /tmp/lavis-venv/bin/pip install torch==2.13.0 transformers==4.33.2 \\
      safetensors omegaconf
  python3.11 -m venv /tmp/lavis-paper-venv && /tmp/lavis-paper-venv/bin/pip install torch==2.13.0 \\
      transformers==4.26.1 safetensors omegaconf
  /tmp/lavis-venv/bin/python tests/reference/lavis_generate.py head --lavis /tmp/LAVIS
  /tmp/lavis-paper-venv/bin/python tests/reference/lavis_generate.py paper --lavis /tmp/LAVIS
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import pathlib
import subprocess
import sys
import tempfile
import types

# Run as a script, this file's folder would come first on the path, and tests/reference/tokenizers.py
# would hide the `tokenizers` package from transformers: the repository root takes its place.
REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path[0] = str(REPO)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from tests.reference.hf_models import perturb  # noqa: E402

COMMITS = {"head": "506965b9c4a18c1e565bd32acaccabe0198433f7", "paper": "85907dd28e144cfff6844be1dac4bfe708978c9f"}
PIN = {"head": "4.33.2", "paper": "4.26.1"}
OUT = REPO / "tests" / "fixtures" / "lavis_generate"
FILES = ["models/base_model.py"] + [f"models/blip2_models/{f}" for f in ("blip2.py", "blip2_opt.py", "blip2_t5.py",
                                                                         "modeling_t5.py", "modeling_opt.py", "Qformer.py")]
VISION = dict(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
              intermediate_size=24, layer_norm_eps=1e-6)
QFORMER = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
               max_position_embeddings=32, cross_attention_frequency=2, encoder_hidden_size=16)
TEXT = {
    "opt": dict(model_type="opt", vocab_size=48, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                ffn_dim=32, max_position_embeddings=64, word_embed_proj_dim=16, bos_token_id=2, eos_token_id=2,
                pad_token_id=1),
    "t5": dict(model_type="t5", vocab_size=48, d_model=16, d_ff=24, d_kv=8, num_layers=2, num_decoder_layers=2,
               num_heads=2, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
               tie_word_embeddings=False, pad_token_id=0, decoder_start_token_id=0),
}
NUM_QUERY_TOKENS, IMAGES, SEED = 6, 4, 0
WORDS = ["a", "photo", "of", "Question:", "Answer:", "Short", "answer:", "what", "is", "the", "man", "holding?",
         "color", "sky?", "how", "many"]
T5_END = 1  # the `</s>` T5's tokenizer appends to prompts (generation's EOS is EOS below)
# Each LM's EOS for generation: a word id and a factor on its LM-head row (OPT's row is also its input
# embedding), so that EOS is likely where its logit is positive and comes at varied steps. Picked by
# trying every word id with factors 1-4 on LAVIS@HEAD: with these, LAVIS's own ids change when
# min_length is one higher in the VQA, greedy and repetition cases (the minimum binds exactly where
# LAVIS and `transformers` count differently), and in the caption case beams that end on EOS (OPT after
# 24 and 27 tokens, T5 after 15) compete with beams cut at max length so closely that the cut-off
# beams' normaliser (prefix + n tokens, not n) decides which wins.
EOS = {"opt": (11, 4.0), "t5": (26, 2.0)}
FIRST_WORD_ID = 5  # word i gets id FIRST_WORD_ID + i; lower ids are the special tokens
QUESTIONS = ["what is the man holding?", "what color is the sky?", "how many", "what is a photo of the man holding?"]
# Each case: which LAVIS method and its arguments (tests/test_generation_lavis.py maps them to ours).
CASES = [
    dict(name="caption", method="generate", prompt="a photo of", lavis=dict(num_beams=5, max_length=30, min_length=8)),
    dict(name="vqa", method="predict_answers", prompt={"opt": "Question: {} Answer:", "t5": "Question: {} Short answer:"},
         lavis=dict(num_beams=5, max_len=10, min_len=1, length_penalty=-1.0)),
    dict(name="greedy", method="generate", prompt="a photo of", lavis=dict(num_beams=1, max_length=12, min_length=10)),
    dict(name="repetition", method="generate", prompt="",
         lavis=dict(num_beams=3, max_length=16, min_length=3, repetition_penalty=1.5, length_penalty=0.5)),
]
PAPER_CASES = {"opt": ["caption", "greedy", "repetition"], "t5": ["caption", "vqa", "greedy", "repetition"]}


class WordTokenizer:
    """Stands for LAVIS's OPT/T5 tokenizers: whitespace words to fixed ids, OPT's BOS before and T5's
    `</s>` after; `batch_decode` records the ids LAVIS's generate produced."""

    def __init__(self, *, bos: int | None, eos: int | None, pad: int):
        self.bos, self.eos, self.pad, self.padding_side = bos, eos, pad, "right"
        self.decoded: list[list[int]] = []

    def ids(self, text: str) -> list[int]:
        words = [FIRST_WORD_ID + WORDS.index(w) for w in text.split()]
        return ([self.bos] if self.bos is not None else []) + words + ([self.eos] if self.eos is not None else [])

    def __call__(self, texts, return_tensors="pt", padding="longest", truncation=False, max_length=None):
        del return_tensors, padding, truncation, max_length  # prompts here are short and padded to the longest
        rows = [self.ids(t) for t in ([texts] if isinstance(texts, str) else texts)]
        width = max(len(r) for r in rows)
        ids, mask = np.full((len(rows), width), self.pad), np.zeros((len(rows), width), np.int64)
        for i, r in enumerate(rows):
            span = slice(width - len(r), width) if self.padding_side == "left" else slice(0, len(r))
            ids[i, span], mask[i, span] = r, 1
        return transformers.BatchEncoding({"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)})

    def batch_decode(self, ids, skip_special_tokens=True):
        del skip_special_tokens
        self.decoded.append(ids.tolist())
        return [" ".join(map(str, row)) for row in ids.tolist()]


def import_lavis(clone: str, commit: str, scratch: pathlib.Path) -> types.ModuleType:
    """LAVIS's blip2_models package at `commit`, its model files unmodified, with stubs for the
    helpers generation never calls."""
    package = scratch / "lavis"
    for sub in ("common", "models/blip2_models"):
        (package / sub).mkdir(parents=True, exist_ok=True)
    for init in ("", "common/", "models/", "models/blip2_models/"):
        (package / init / "__init__.py").write_text("")
    for name in FILES:
        source = subprocess.run(["git", "-C", clone, "show", f"{commit}:lavis/{name}"], capture_output=True, text=True)
        if source.returncode == 0:  # modeling_opt.py exists only in the paper era
            (package / name).write_text(source.stdout)
    stubs = {
        "common/registry.py": "class _Registry:\n    def register_model(self, name):\n        return lambda cls: cls\n"
                              "registry = _Registry()\n",
        "common/dist_utils.py": "def download_cached_file(*a, **k):\n    raise RuntimeError('offline')\n"
                                "def is_dist_avail_and_initialized():\n    return False\n",
        "common/utils.py": "def is_url(x):\n    return False\ndef get_abs_path(x):\n    return x\n",
        "common/logger.py": "class MetricLogger:\n    pass\n",
        "models/eva_vit.py": "def create_eva_vit_g(*a, **k):\n    raise RuntimeError('not used')\n",
        "models/clip_vit.py": "def create_clip_vit_L(*a, **k):\n    raise RuntimeError('not used')\n",
    }
    for path, text in stubs.items():
        (package / path).write_text(text)
    sys.path.insert(0, str(scratch))
    for module in ("blip2_opt", "blip2_t5", "modeling_opt"):
        if (package / "models/blip2_models" / f"{module}.py").exists():
            importlib.import_module(f"lavis.models.blip2_models.{module}")
    return sys.modules["lavis.models.blip2_models"]


class VisualEncoder(torch.nn.Module):
    """HF's Blip2 vision tower as LAVIS's `ln_vision(visual_encoder(image))` (its post-LayerNorm is
    LAVIS's ln_vision, so `ln_vision` is the identity)."""

    def __init__(self, vision: torch.nn.Module):
        super().__init__()
        self.vision = vision

    def forward(self, image):
        return self.vision(pixel_values=image).last_hidden_state


class ReplayedQformer(torch.nn.Module):
    """The Q-Former outputs `head` computed (4.26 has no Blip2), returned for the same images."""

    def __init__(self, images: torch.Tensor, outputs: torch.Tensor):
        super().__init__()
        self.images, self.outputs = images, outputs

    def forward(self, query_embeds, encoder_hidden_states, encoder_attention_mask, return_dict=True):
        del query_embeds, encoder_attention_mask, return_dict
        rows = [int(torch.nonzero((self.images == x).flatten(1).all(1))[0]) for x in encoder_hidden_states]
        return types.SimpleNamespace(last_hidden_state=self.outputs[rows])


def lavis_model(blip2_models: types.ModuleType, lm: str, towers: dict, language_model: torch.nn.Module,
                eos: int) -> torch.nn.Module:
    """A Blip2OPT/Blip2T5 without its __init__ (which downloads ViT-g and the LLM): the attributes
    its generate and predict_answers read."""
    cls = blip2_models.blip2_opt.Blip2OPT if lm == "opt" else blip2_models.blip2_t5.Blip2T5
    model = cls.__new__(cls)
    torch.nn.Module.__init__(model)
    model.visual_encoder, model.ln_vision = towers["visual_encoder"], torch.nn.Identity()
    model.Qformer = torch.nn.Module()
    model.Qformer.bert = towers["qformer"]
    model.query_tokens = towers["query_tokens"]
    model.prompt, model.max_txt_len, model._apply_lemmatizer = "", 32, False  # pylint: disable=protected-access
    if lm == "opt":
        model.opt_proj, model.opt_model, model.eos_token_id = towers["projection"], language_model, eos
        model.opt_tokenizer = WordTokenizer(bos=TEXT["opt"]["bos_token_id"], eos=None, pad=TEXT["opt"]["pad_token_id"])
    else:
        model.t5_proj, model.t5_model = towers["projection"], language_model
        model.t5_tokenizer = WordTokenizer(bos=None, eos=T5_END, pad=TEXT["t5"]["pad_token_id"])
    return model.eval()


def vendored_t5(blip2_models: types.ModuleType, config: transformers.PretrainedConfig,
                weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """LAVIS's own T5 (modeling_t5.py) with exact GELU, as Blip2T5.__init__ configures it."""
    config = transformers.T5Config(**config.to_dict())
    config.dense_act_fn = "gelu"
    t5 = blip2_models.modeling_t5.T5ForConditionalGeneration(config)
    t5.load_state_dict(weights)
    return t5.eval()


@contextlib.contextmanager
def fp32_autocast():
    """LAVIS@85907dd's Blip2T5.predict_answers runs T5 under `torch.amp.autocast(bfloat16)` even on
    a CPU (HEAD's `maybe_autocast` skips CPUs): the fixtures compare decoding rules in fp32, so every
    autocast LAVIS opens here is disabled. LAVIS's code itself is unchanged."""
    original = torch.amp.autocast

    def disabled(*args, **kwargs):
        return original(*args, **{**kwargs, "enabled": False})

    torch.amp.autocast = disabled
    try:
        yield
    finally:
        torch.amp.autocast = original


def run_case(model: torch.nn.Module, case: dict, lm: str, images: torch.Tensor, strip: int,
             eos: int) -> tuple[list[list[int]], list[list[int]]]:
    """LAVIS's call for `case`; returns the prompts' ids and each image's generated ids up to and
    including EOS (the first `strip` ids are the dummy BOS, the decoder start or the prompt)."""
    tokenizer = model.opt_tokenizer if lm == "opt" else model.t5_tokenizer
    prompt = case["prompt"][lm] if isinstance(case["prompt"], dict) else case["prompt"]
    with torch.no_grad(), fp32_autocast():
        if case["method"] == "generate":
            prompts = [prompt] * len(images)
            model.generate({"image": images, "prompt": prompt}, **case["lavis"])
        else:
            prompts = [prompt.format(q) for q in QUESTIONS[:len(images)]]
            model.predict_answers({"image": images, "text_input": QUESTIONS[:len(images)]}, prompt=prompt,
                                  **case["lavis"])
    rows = tokenizer.decoded.pop()
    out = []
    for row in rows:
        row = row[strip:]
        out.append(row[:row.index(eos) + 1] if eos in row else row)
    return [tokenizer.ids(p) for p in prompts], out


def head(clone: str, out: pathlib.Path, scratch: pathlib.Path) -> None:
    blip2_models = import_lavis(clone, COMMITS["head"], scratch)
    images = torch.tensor(np.random.default_rng(SEED).standard_normal((IMAGES, 3, 16, 16)), dtype=torch.float32)
    results, replay = {}, {"images": images.numpy()}
    for lm in ("opt", "t5"):
        torch.manual_seed(SEED)
        eos, boost = EOS[lm]
        config = transformers.Blip2Config(vision_config=VISION, qformer_config=QFORMER,
                                          text_config=dict(TEXT[lm], eos_token_id=eos),
                                          num_query_tokens=NUM_QUERY_TOKENS)
        hf = perturb(transformers.Blip2ForConditionalGeneration(config), seed=SEED, scale=0.5)
        with torch.no_grad():  # a louder visual prompt (the images, not only the text, steer the tiny LM) and EOS
            hf.language_projection.weight.mul_(5.0)
            hf.language_model.lm_head.weight[eos].mul_(boost)
        towers = dict(visual_encoder=VisualEncoder(hf.vision_model), qformer=hf.qformer,
                      query_tokens=hf.query_tokens, projection=hf.language_projection)
        language_model = hf.language_model if lm == "opt" else vendored_t5(
            blip2_models, hf.config.text_config, hf.language_model.state_dict())
        model = lavis_model(blip2_models, lm, towers, language_model, eos=eos)
        with torch.no_grad():
            replay[f"{lm}_qformer"] = hf.qformer(query_embeds=hf.query_tokens.expand(IMAGES, -1, -1),
                                                 encoder_hidden_states=towers["visual_encoder"](images)
                                                 ).last_hidden_state.numpy()
        weights = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}
        save_file(weights, str(out / f"{lm}.safetensors"))
        saved = hf.config.to_dict()
        if lm == "t5":
            saved["text_config"]["dense_act_fn"] = "gelu"
        (out / f"{lm}_config.json").write_text(json.dumps(saved, indent=1, sort_keys=True) + "\n")
        results[lm] = {"eos": eos, "cases": {}}
        for case in CASES:
            prompts, ids = run_case(model, case, lm, images, strip=1, eos=eos)
            results[lm]["cases"][case["name"]] = dict(prompts=prompts, ids=ids)
    np.savez(out / "inputs.npz", **replay)
    write_results(out, "head", results)


def paper(clone: str, out: pathlib.Path, scratch: pathlib.Path) -> None:
    blip2_models = import_lavis(clone, COMMITS["paper"], scratch)
    replay = np.load(out / "inputs.npz")
    images = torch.tensor(replay["images"])
    head_results = json.loads((out / "ids.json").read_text())["head"]["results"]
    results = {}
    for lm in ("opt", "t5"):
        weights = {k: torch.tensor(v) for k, v in load_file(str(out / f"{lm}.safetensors")).items()}
        saved = json.loads((out / f"{lm}_config.json").read_text())["text_config"]
        llm = {k[len("language_model."):]: v for k, v in weights.items() if k.startswith("language_model.")}
        if lm == "opt":
            language_model = blip2_models.modeling_opt.OPTForCausalLM(transformers.OPTConfig(**saved))
            language_model.load_state_dict(llm)
            language_model.eval()
        else:
            language_model = vendored_t5(blip2_models, transformers.T5Config(**saved), llm)
        projection = torch.nn.Linear(*weights["language_projection.weight"].shape[::-1])
        projection.load_state_dict({"weight": weights["language_projection.weight"],
                                    "bias": weights["language_projection.bias"]})
        towers = dict(visual_encoder=torch.nn.Identity(), query_tokens=torch.nn.Parameter(weights["query_tokens"]),
                      qformer=ReplayedQformer(images, torch.tensor(replay[f"{lm}_qformer"])), projection=projection)
        eos = head_results[lm]["eos"]
        model = lavis_model(blip2_models, lm, towers, language_model, eos=eos)
        results[lm] = {"eos": eos, "cases": {}}
        for case in CASES:
            if case["name"] in PAPER_CASES[lm]:
                # 85907dd's OPT decodes after dropping the prompt ids itself; T5 starts with its start token.
                prompts, ids = run_case(model, case, lm, images, strip=0 if lm == "opt" else 1, eos=eos)
                results[lm]["cases"][case["name"]] = dict(prompts=prompts, ids=ids)
    write_results(out, "paper", results)


def write_results(out: pathlib.Path, era: str, results: dict) -> None:
    path = out / "ids.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[era] = dict(lavis_commit=COMMITS[era], transformers=transformers.__version__, torch=torch.__version__,
                     results=results)
    data["cases"] = CASES
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path} ({era}: LAVIS {COMMITS[era][:7]}, transformers {transformers.__version__})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("era", choices=["head", "paper"])
    parser.add_argument("--lavis", required=True, help="a git clone of salesforce/LAVIS (any checkout)")
    parser.add_argument("--out", type=pathlib.Path, default=OUT)
    args = parser.parse_args()
    if transformers.__version__ != PIN[args.era]:
        raise SystemExit(f"{args.era} needs transformers=={PIN[args.era]} (LAVIS's pin), this is "
                         f"{transformers.__version__}")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        (head if args.era == "head" else paper)(args.lavis, args.out, pathlib.Path(scratch))


if __name__ == "__main__":
    main()
