"""The `blip2-jax` command.

    blip2-jax train --config configs/<file>.py:<preset> --workdir DIR
    blip2-jax generate --checkpoint DIR_OR_HUB_ID --image a.jpg [--image b.jpg] [--prompt "a photo of"]
    blip2-jax generate --checkpoint DIR_OR_HUB_ID --image a.jpg --question "what is in the picture?"
    blip2-jax data build --annotations a.json [--annotations b.json] --image_root DIR --output DIR/prefix --num_shards N

`train` runs the same command on every host of a pod or cluster; multi-host jobs join through
`--coordinator_address/--num_processes/--process_id` or their scheduler's environment. `generate`
prints `path<TAB>text` per image: a caption, or with `--question` an answer; search settings default
to the paper's (CAPTION, or VQA_OPT/VQA_T5) and each flag given overrides one field. `data build`
converts LAVIS-style JSON annotations and their images into ArrayRecord shards (`data/sources.py`).
"""
import dataclasses

from absl import app, flags, logging
from ml_collections import config_flags

# train
_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config: configs/<file>.py:<preset>.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard logs.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index (multi-host).")

# generate
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Hugging Face BLIP-2 directory (with its tokenizer) or hub id.")
_IMAGES = flags.DEFINE_multi_string("image", [], "Image file; repeat for several.")
_PROMPT = flags.DEFINE_string("prompt", None, "Text the output continues; with --question, a template with {} "
                              "(default: the paper's VQA prompt for the checkpoint's LLM).")
_QUESTIONS = flags.DEFINE_multi_string("question", [], "Answer this question instead of captioning: one for all "
                                       "images or one per --image.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Images per compiled generate call.")
_DTYPE = flags.DEFINE_string("dtype", None, "Parameter and compute dtype, e.g. bfloat16 (default float32).")
# data build
_ANNOTATIONS = flags.DEFINE_multi_string("annotations", [], "LAVIS-style JSON annotation file; repeat for several.")
_IMAGE_ROOT = flags.DEFINE_string("image_root", None, "Directory the annotations' image paths are relative to.")
_OUTPUT = flags.DEFINE_string("output", None, "Shard path prefix: writes PREFIX-00000-of-0000N.array_record, ...")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 1, "Number of ArrayRecord files to write.")

_SEARCH = {  # GenerationConfig fields settable from the command line; None keeps the preset's value
    "num_beams": flags.DEFINE_integer("num_beams", None, "Beams (1: greedy)."),
    "max_new_tokens": flags.DEFINE_integer("max_new_tokens", None, "Most tokens generated."),
    "min_new_tokens": flags.DEFINE_integer("min_new_tokens", None, "EOS is forbidden before this many tokens."),
    "length_penalty": flags.DEFINE_float("length_penalty", None, "Beam score = sum log p / length ** this."),
    "repetition_penalty": flags.DEFINE_float("repetition_penalty", None, "CTRL-style penalty on seen tokens."),
}

USAGE = ("usage: blip2-jax train --config configs/<file>.py:<preset> --workdir DIR\n"
         "       blip2-jax generate --checkpoint DIR_OR_HUB_ID --image FILE [--image FILE ...] [--prompt TEXT] "
         "[--question TEXT]\n"
         "       blip2-jax data build --annotations FILE --image_root DIR --output PREFIX --num_shards N")


def train() -> None:
    from blip2_jax.train import loop  # pylint: disable=import-outside-toplevel  # keep --help fast

    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO; steps print to stdout
    config = _CONFIG.value
    if config is None or not _WORKDIR.value:
        raise app.UsageError("train needs --config and --workdir\n" + USAGE)
    if _COORDINATOR.value:
        config.distributed.update(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                                  process_id=_PROCESS_ID.value)
    loop.train(config, _WORKDIR.value)


def generate() -> None:
    # pylint: disable=import-outside-toplevel  # keep --help fast
    from blip2_jax.generation.api import Blip2Generator
    from blip2_jax.generation.config import CAPTION, VQA_OPT, VQA_T5
    from blip2_jax.models.config import T5Config

    if not _CHECKPOINT.value or not _IMAGES.value:
        raise app.UsageError("generate needs --checkpoint and at least one --image\n" + USAGE)
    generator = Blip2Generator.from_pretrained(_CHECKPOINT.value, dtype=_DTYPE.value, batch_size=_BATCH_SIZE.value)
    overrides = {k: f.value for k, f in _SEARCH.items() if f.value is not None}
    if _QUESTIONS.value:
        preset = VQA_T5 if isinstance(generator.config.text, T5Config) else VQA_OPT
        questions = _QUESTIONS.value[0] if len(_QUESTIONS.value) == 1 else _QUESTIONS.value
        texts = generator.answer(_IMAGES.value, questions, _PROMPT.value, dataclasses.replace(preset, **overrides))
    else:
        texts = generator.caption(_IMAGES.value, _PROMPT.value or "", dataclasses.replace(CAPTION, **overrides))
    for path, text in zip(_IMAGES.value, texts):
        print(f"{path}\t{text}")


def data_build() -> None:
    from blip2_jax.data import sources  # pylint: disable=import-outside-toplevel  # keep --help fast

    if not _ANNOTATIONS.value or not _IMAGE_ROOT.value or not _OUTPUT.value:
        raise app.UsageError("data build needs --annotations, --image_root and --output\n" + USAGE)
    source = sources.JsonSource(_ANNOTATIONS.value, _IMAGE_ROOT.value)
    paths, missing = sources.write_array_records(source, _OUTPUT.value, _NUM_SHARDS.value)
    print(f"wrote {len(source) - len(missing)} records to {len(paths)} shards {_OUTPUT.value}-*-of-"
          f"{len(paths):05d}.array_record; {len(missing)} left out (image file missing)")


def main(argv: list[str]) -> None:
    commands = {("train",): train, ("generate",): generate, ("data", "build"): data_build}
    if tuple(argv[1:]) not in commands:
        raise app.UsageError(USAGE)
    commands[tuple(argv[1:])]()


def run() -> None:
    from blip2_jax.data.pipeline import limit_malloc_arenas  # pylint: disable=import-outside-toplevel

    limit_malloc_arenas()  # before any thread allocates: keeps a long input pipeline's memory flat
    app.run(main)
