"""The `lavis` and `lavis_paper` decoding modes against LAVIS's own code: token ids equal what
LAVIS@HEAD's Blip2OPT/Blip2T5 `generate`/`predict_answers` returned under transformers 4.33.2 and what
the paper-era (85907dd) ones returned under 4.26.1, on tiny random models. The fixtures come from
tests/reference/lavis_generate.py (its docstring says how to regenerate them); this test needs
neither LAVIS nor an old transformers. The `transformers` mode gives other ids in every case, so the
comparison can fail."""
import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from blip2_jax.generation.api import prompt_arrays
from blip2_jax.generation.config import CAPTION, VQA_OPT, VQA_T5, GenerationConfig
from blip2_jax.generation.decode import generate_fn
from blip2_jax.models import blip2
from blip2_jax.models import config as config_lib
from blip2_jax.weights.hf_checkpoint import params_from_state_dict
from tests.reference import hf_models as ref

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "lavis_generate"
IDS = json.loads((FIXTURES / "ids.json").read_text())
LAVIS_ARGS = {case["name"]: case["lavis"] for case in IDS["cases"]}
MODE = {"head": "lavis", "paper": "lavis_paper"}


def ours(era: str, lm: str, case: str) -> GenerationConfig:
    """LAVIS's arguments for `case` as our setting: max_new_tokens is what that code generates at
    most (OPT's `max_length` at HEAD counts the dummy BOS; `max_new_tokens` and T5's do not)."""
    args = dict(LAVIS_ARGS[case])
    if "max_len" in args:  # predict_answers: max_new_tokens=max_len, min_length=min_len
        max_new, min_length = args.pop("max_len"), args.pop("min_len")
    else:
        max_new, min_length = args.pop("max_length"), args.pop("min_length")
        max_new -= era == "head" and lm == "opt"
    return GenerationConfig(semantics=MODE[era], max_new_tokens=max_new, min_length=min_length, **args)


@pytest.fixture(scope="module", params=["opt", "t5"])
def lm(request):
    kind = request.param
    cfg = config_lib.from_hf(json.loads((FIXTURES / f"{kind}_config.json").read_text()))
    images = np.load(FIXTURES / "inputs.npz")["images"]
    return dict(kind=kind, model=blip2.build(cfg), config=cfg, images=jnp.asarray(ref.nhwc(images)),
                params=params_from_state_dict(load_file(str(FIXTURES / f"{kind}.safetensors")), cfg),
                eos=IDS["head"]["results"][kind]["eos"])


def _generate(lm, config: GenerationConfig, prompts: list[list[int]]) -> list[list[int]]:
    ids, mask = prompt_arrays(prompts, lm["config"])
    config = GenerationConfig(**{**config.__dict__, "eos_token_id": lm["eos"]})
    out = generate_fn(lm["model"], config)(lm["params"], lm["images"], jnp.asarray(ids), jnp.asarray(mask))
    tokens, lengths = np.asarray(out.tokens[:, 0]), np.asarray(out.lengths[:, 0])
    return [t[:n].tolist() for t, n in zip(tokens, lengths)]


CASES = [(era, case) for era in ("head", "paper") for case in LAVIS_ARGS]


@pytest.mark.parametrize("era,case", CASES, ids=[f"{e}-{c}" for e, c in CASES])
def test_token_ids_equal_lavis(lm, era, case):
    expected = IDS[era]["results"][lm["kind"]]["cases"].get(case)
    if expected is None:
        pytest.skip(f"the paper-era {lm['kind']} code has no {case} case (no VQA method for OPT before May 2023)")
    assert _generate(lm, ours(era, lm["kind"], case), expected["prompts"]) == expected["ids"]


@pytest.mark.parametrize("era", ["head", "paper"])
def test_the_modes_differ_from_transformers_on_these_cases(lm, era):
    """LAVIS's numbers read with `transformers`' rules (min_len as min_new_tokens, its beam
    normaliser and stopping, its penalty scope) give other ids in every case, OPT and T5, caption
    included: the fixtures' EOS comes right where the two count the minimum differently, and caption
    beams ending on EOS compete closely with cut-off ones, so they would catch a mode that fell back to
    those rules."""
    results = IDS[era]["results"][lm["kind"]]["cases"]
    differ = []
    for case, expected in results.items():
        setting = ours(era, lm["kind"], case)
        plain = GenerationConfig(**{**setting.__dict__, "semantics": "transformers", "min_length": 0,
                                    "min_new_tokens": setting.min_length})
        if _generate(lm, plain, expected["prompts"]) != expected["ids"]:
            differ.append(case)
    assert differ == list(results), differ


def test_presets_name_the_mode_of_the_code_behind_the_published_numbers():
    assert (CAPTION.semantics, CAPTION.max_new_tokens, CAPTION.min_length) == ("lavis_paper", 30, 8)
    assert (VQA_OPT.semantics, VQA_OPT.min_length, VQA_OPT.length_penalty) == ("lavis", 1, -1.0)
    assert VQA_T5.semantics == "lavis_paper" and VQA_T5.max_new_tokens == 10


def test_minimums_are_counted_the_way_each_mode_counts_them():
    with pytest.raises(ValueError, match="min_new_tokens"):
        GenerationConfig(semantics="lavis", min_new_tokens=7)
    with pytest.raises(ValueError, match="min_length"):
        GenerationConfig(min_length=8)
    with pytest.raises(ValueError, match="semantics"):
        GenerationConfig(semantics="lavis_head")
    with pytest.raises(ValueError, match="4.26"):
        GenerationConfig(semantics="lavis_paper", num_beams=2, early_stopping="never")
