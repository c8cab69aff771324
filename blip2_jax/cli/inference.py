"""`blip2-jax generate` and `eval`: the commands that run a trained model."""
from __future__ import annotations

import dataclasses
import json

from absl import app, flags, logging

from blip2_jax.cli.command import Command, define_checkpoint, define_config, define_out, define_tokenizer, \
    loaded_config

# GenerationConfig fields settable from the command line; None keeps the preset's value
_SEARCH = {"num_beams", "max_new_tokens", "min_new_tokens", "min_length", "semantics", "length_penalty",
           "repetition_penalty"}


def _generate_flags(values: flags.FlagValues, argv: list[str]) -> None:
    del argv
    define_checkpoint(values, "The stage-2 model")
    define_tokenizer(values, "default: the checkpoint's")
    flags.DEFINE_multi_string("image", [], "Image file; repeat for several.", flag_values=values)
    flags.DEFINE_string("prompt", None, "Text the output continues; with --question, a template with {} "
                        "(default: the paper's VQA prompt for the checkpoint's LLM).", flag_values=values)
    flags.DEFINE_multi_string("question", [], "Answer this question instead of captioning: one for all images "
                              "or one per --image.", flag_values=values)
    flags.DEFINE_integer("batch_size", 8, "Images per compiled generate call.", flag_values=values)
    define_dtype(values)
    flags.DEFINE_boolean("int8", False, "Run the frozen LLM's and ViT's dense layers with int8 kernels (per-channel, "
                         "quantized at load).", flag_values=values)
    define_search(values)


def define_dtype(values: flags.FlagValues) -> None:
    flags.DEFINE_string("dtype", None, "Parameter and compute dtype, e.g. bfloat16 (default float32).",
                        flag_values=values)


def define_search(values: flags.FlagValues) -> None:
    """The decoding flags (search_config applies them over a preset)."""
    flags.DEFINE_integer("num_beams", None, "Beams (1: greedy).", flag_values=values)
    flags.DEFINE_integer("max_new_tokens", None, "Most tokens generated; below the preset's min_length (and "
                         "without --min_length) it lowers min_length to it.", flag_values=values)
    flags.DEFINE_integer("min_new_tokens", None, "EOS is forbidden before this many tokens (--semantics "
                         "transformers).", flag_values=values)
    flags.DEFINE_integer("min_length", None, "LAVIS's min_len, counted as the --semantics counts it (lavis, "
                         "lavis_paper).", flag_values=values)
    flags.DEFINE_enum("semantics", None, ["transformers", "lavis", "lavis_paper"],
                      "Whose decoding rules: transformers.generate 5.x, LAVIS@HEAD (transformers 4.33) or the "
                      "paper-era LAVIS (the presets: captions lavis_paper, VQA lavis for OPT, lavis_paper for "
                      "FlanT5). transformers drops the preset's min_length.", flag_values=values)
    flags.DEFINE_float("length_penalty", None, "Beam score = sum log p / length ** this.", flag_values=values)
    flags.DEFINE_float("repetition_penalty", None, "CTRL-style penalty on seen tokens.", flag_values=values)


def search_config(values: flags.FlagValues, preset):
    """`preset` with the search flags given; a --max_new_tokens below the preset's min_length lowers
    min_length to it (else EOS stays forbidden to the end and every text runs to the maximum)."""
    overrides = {k: values[k].value for k in _SEARCH if values[k].value is not None}
    if overrides.get("semantics") == "transformers":  # LAVIS's min_len has no meaning there
        overrides.setdefault("min_length", 0)
    if "max_new_tokens" in overrides:
        overrides.setdefault("min_length", min(preset.min_length, overrides["max_new_tokens"]))
    return dataclasses.replace(preset, **overrides)


def _generate(values: flags.FlagValues) -> None:
    # pylint: disable=import-outside-toplevel  # keep --help fast
    from blip2_jax.data.images import check_image_file
    from blip2_jax.generation.api import Blip2Generator, check_question_template
    from blip2_jax.generation.config import CAPTION, VQA_OPT, VQA_T5
    from blip2_jax.models import quantization
    from blip2_jax.models.config import T5Config

    if not values.checkpoint or not values.image:
        raise app.UsageError(f"generate needs --checkpoint and at least one --image\n{GENERATE.usage()}")
    for image in values.image:  # before the model loads
        check_image_file(image)
    if values.question and values.prompt is not None:
        check_question_template(values.prompt)
    search_config(values, CAPTION)  # the flags' own checks, before the model loads
    generator = Blip2Generator.from_pretrained(values.checkpoint, dtype=values.dtype, batch_size=values.batch_size,
                                               step=values.step, tokenizer=values.tokenizer,
                                               int8=quantization.TOWERS if values.int8 else ())
    if values.question:
        preset = VQA_T5 if isinstance(generator.config.text, T5Config) else VQA_OPT
        questions = values.question[0] if len(values.question) == 1 else values.question
        texts = generator.answer(values.image, questions, values.prompt, search_config(values, preset))
    else:
        texts = generator.caption(values.image, values.prompt or "", search_config(values, CAPTION))
    for path, text in zip(values.image, texts):
        print(f"{path}\t{text}")


def _eval_flags(values: flags.FlagValues, argv: list[str]) -> None:
    define_config(values, argv, "Evaluation config (configs/eval/)")
    define_checkpoint(values, "The model evaluated (default: the config's)")
    define_out(values, "a directory for results.json and metrics.json")


def _eval(values: flags.FlagValues) -> None:
    from blip2_jax.evaluate.run import evaluate  # pylint: disable=import-outside-toplevel

    logging.set_verbosity(logging.WARNING)
    config = loaded_config(values)
    if config is None or not values.out:
        raise app.UsageError(f"eval needs --config and --out\n{EVAL.usage()}")
    if values.checkpoint:
        config.checkpoint = values.checkpoint
    if values.step is not None:
        config.step = values.step
    scores = evaluate(config, values.out)  # checks the config before it loads anything (train/validate.py)
    print(json.dumps(scores, indent=2))
    print(f"wrote {values.out}/results.json and {values.out}/metrics.json")


GENERATE = Command(("generate",), "--checkpoint DIR_OR_HUB_ID --image FILE [--image FILE ...] [--prompt TEXT] "
                   "[--question TEXT ...] [--step N]",
                   "Captions images, or answers questions about them, with a stage-2 model; prints path<TAB>text.",
                   _generate_flags, _generate)
EVAL = Command(("eval",), "--config configs/eval/<task>.py:<preset> --checkpoint DIR_OR_HUB_ID --out DIR [--step N]",
               "Runs a captioning, VQA or retrieval preset over a whole set on every device and host.",
               _eval_flags, _eval)
