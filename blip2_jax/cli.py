"""The `blip2-jax` command.

    blip2-jax demo [--workdir DIR]       # the whole pipeline on the packaged easy-VQA set, CPU, 8-13 min on 2 cores
    blip2-jax train --config configs/<file>.py:<preset> --workdir DIR
    blip2-jax generate --checkpoint DIR_OR_HUB_ID --image a.jpg [--image b.jpg] [--prompt "a photo of"]
    blip2-jax generate --checkpoint DIR_OR_HUB_ID --image a.jpg --question "what is in the picture?"
    blip2-jax data build --annotations a.json [--annotations b.json] --image_root DIR --output DIR/prefix --num_shards N
    blip2-jax convert from-hf --src DIR_OR_HUB_ID --out DIR [--dtype float32]
    blip2-jax convert to-hf --checkpoint DIR [--step N] --out DIR [--dtype bfloat16] [--tokenizer DIR_OR_HUB_ID]
    blip2-jax convert from-lavis --src FILE.pth --model PRESET [--vision eva_vit_g.pth] [--text DIR_OR_HUB_ID] --out DIR
    blip2-jax convert to-lavis --checkpoint DIR [--step N] --out FILE.pth [--vision_out eva_vit_g.pth]
    blip2-jax plan --config configs/<file>.py:<preset> --mesh data=D,fsdp=F,tensor=T [--batch N] [--device_kind v4]
    blip2-jax eval --config configs/eval/<task>.py:<preset> --checkpoint DIR_OR_HUB_ID --out DIR [--step N]

`train` runs the same command on every host of a pod or cluster; multi-host jobs join through
`--coordinator_address/--num_processes/--process_id` or their scheduler's environment. `generate`
prints `path<TAB>text` per image: a caption, or with `--question` an answer; search settings default
to the presets behind the published numbers (CAPTION, or VQA_OPT/VQA_T5, each in its decoding
mode) and each flag given overrides one field. `data build` converts LAVIS-style JSON annotations
and their images into ArrayRecord shards (`data/sources.py`).
`convert` moves weights between our Orbax model checkpoints (or training workdirs) and Hugging
Face directories or LAVIS `.pth` files, tensor by tensor (`convert/hf_export.py`, `convert/lavis.py`).
`eval` runs a captioning, VQA or retrieval preset over a whole set on every device and host,
writing results.json and metrics.json to `--out` (`evaluate/run.py`). `demo` trains and evaluates
BLIP-2 end to end on the packaged easy-VQA set on 2 simulated CPU devices (`demo/run.py`).

A user error (a bad flag, config value, path or input; `errors.UserError`) prints one or two lines,
`blip2-jax: error: ...`, and exits with code 2; any other exception is a bug and keeps its traceback.
Configs are checked before anything compiles (`train/validate.py`). SIGTERM before the training loop
starts exits 0 at once (nothing is trained yet, so there is nothing to save).
"""
import dataclasses
import functools
import os
import signal
import sys
import threading
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from blip2_jax.errors import InputNotFound, UserError

# train
_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config: configs/<file>.py:<preset>.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard logs.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index (multi-host).")

# generate
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "generate: a Hugging Face BLIP-2 directory (with its tokenizer) "
                                  "or hub id; convert to-hf/to-lavis: a model checkpoint or training workdir.")
_IMAGES = flags.DEFINE_multi_string("image", [], "Image file; repeat for several.")
_PROMPT = flags.DEFINE_string("prompt", None, "Text the output continues; with --question, a template with {} "
                              "(default: the paper's VQA prompt for the checkpoint's LLM).")
_QUESTIONS = flags.DEFINE_multi_string("question", [], "Answer this question instead of captioning: one for all "
                                       "images or one per --image.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Images per compiled generate call.")
_DTYPE = flags.DEFINE_string("dtype", None, "generate: parameter and compute dtype, e.g. bfloat16 (default float32); "
                             "convert: storage dtype written (default: the source's, float32 for from-*).")
# data build
_ANNOTATIONS = flags.DEFINE_multi_string("annotations", [], "LAVIS-style JSON annotation file; repeat for several.")
_IMAGE_ROOT = flags.DEFINE_string("image_root", None, "Directory the annotations' image paths are relative to.")
_OUTPUT = flags.DEFINE_string("output", None, "Shard path prefix: writes PREFIX-<build>-00000-of-0000N.array_record, "
                              "... and PREFIX.manifest.json, replacing an earlier set of PREFIX.")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 1, "Number of ArrayRecord files to write.")

# convert
_SRC = flags.DEFINE_string("src", None, "Conversion source: a Hugging Face directory or hub id (from-hf), a LAVIS "
                           ".pth (from-lavis).")
_OUT = flags.DEFINE_string("out", None, "Conversion output: a directory (from-hf, from-lavis, to-hf) or a .pth "
                           "(to-lavis); written under a temporary name and renamed when complete.")
_STEP = flags.DEFINE_integer("step", None, "Training step to export from a workdir (default: the latest).")
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "to-hf: tokenizer to ship (default: the checkpoint's, or the run's "
                                 "data.tokenizer).")
_MAX_SHARD = flags.DEFINE_string("max_shard_size", "5GB", "to-hf: largest safetensors shard.")
_MODEL = flags.DEFINE_string("model", None, "from-lavis: the model preset the checkpoint is (e.g. opt2.7b, "
                             "flant5xl, itm_vit_g).")
_VISION = flags.DEFINE_string("vision", None, "from-lavis: eva_vit_g.pth, for checkpoints without the frozen ViT.")
_TEXT = flags.DEFINE_string("text", None, "from-lavis: the LLM's Hugging Face directory or hub id, for checkpoints "
                            "without the frozen LLM.")
# plan
_MESH = flags.DEFINE_string("mesh", "data=8", "plan: data=D,fsdp=F,tensor=T (simulated CPU devices; over 64, the "
                            "data axis is folded into one replica).")
_BATCH = flags.DEFINE_integer("batch", None, "plan: global batch (default: the preset's).")
_DEVICE_KIND = flags.DEFINE_enum("device_kind", None, ["v4", "v5e", "v5p", "h100", "a100"],
                                 "plan: the device to check the fit on (default: all).")
_VISION_OUT = flags.DEFINE_string("vision_out", None, "to-lavis: also write the ViT as eva_vit_g.pth here.")

_SEARCH = {  # GenerationConfig fields settable from the command line; None keeps the preset's value
    "num_beams": flags.DEFINE_integer("num_beams", None, "Beams (1: greedy)."),
    "max_new_tokens": flags.DEFINE_integer("max_new_tokens", None, "Most tokens generated; below the preset's "
                                           "min_length (and without --min_length) it lowers min_length to it."),
    "min_new_tokens": flags.DEFINE_integer("min_new_tokens", None, "EOS is forbidden before this many tokens "
                                           "(--semantics transformers)."),
    "min_length": flags.DEFINE_integer("min_length", None, "LAVIS's min_len, counted as the --semantics counts it "
                                       "(lavis, lavis_paper)."),
    "semantics": flags.DEFINE_enum("semantics", None, ["transformers", "lavis", "lavis_paper"],
                                   "Whose decoding rules: transformers.generate 5.x, LAVIS@HEAD (transformers "
                                   "4.33) or the paper-era LAVIS (the presets: captions lavis_paper, VQA lavis "
                                   "for OPT, lavis_paper for FlanT5). transformers drops the preset's min_length."),
    "length_penalty": flags.DEFINE_float("length_penalty", None, "Beam score = sum log p / length ** this."),
    "repetition_penalty": flags.DEFINE_float("repetition_penalty", None, "CTRL-style penalty on seen tokens."),
}

USAGE = ("usage: blip2-jax demo [--workdir DIR]\n"
         "       blip2-jax train --config configs/<file>.py:<preset> --workdir DIR\n"
         "       blip2-jax generate --checkpoint DIR_OR_HUB_ID --image FILE [--image FILE ...] [--prompt TEXT] "
         "[--question TEXT]\n"
         "       blip2-jax data build --annotations FILE --image_root DIR --output PREFIX --num_shards N\n"
         "       blip2-jax convert from-hf --src DIR_OR_HUB_ID --out DIR\n"
         "       blip2-jax convert to-hf --checkpoint DIR [--step N] --out DIR [--dtype D] [--tokenizer T]\n"
         "       blip2-jax convert from-lavis --src FILE.pth --model PRESET [--vision FILE] [--text DIR] --out DIR\n"
         "       blip2-jax convert to-lavis --checkpoint DIR [--step N] --out FILE.pth [--vision_out FILE]\n"
         "       blip2-jax plan --config configs/<file>.py:<preset> --mesh data=D,fsdp=F,tensor=T [--batch N]\n"
         "       blip2-jax eval --config configs/eval/<task>.py:<preset> --checkpoint DIR_OR_HUB_ID --out DIR")


def _simulated_cpu_devices(count: int) -> None:
    """Run on `count` simulated CPU devices: read when JAX starts its backend, so set before that."""
    import os  # pylint: disable=import-outside-toplevel

    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={count}"
    if "JAX_PLATFORMS" not in os.environ:
        import jax  # pylint: disable=import-outside-toplevel

        jax.config.update("jax_platforms", "cpu")


def _usage(command: str) -> str:
    """The usage line of `command` ('train', 'convert to-hf', ...)."""
    lines = [line.split("blip2-jax ", 1)[1] for line in USAGE.splitlines()]
    return "usage: blip2-jax " + next(line for line in lines if line.startswith(f"{command} "))


def _config(command: str):
    """The parsed --config; a file that does not exist is a user error (ml_collections defers it to
    the first field read, as an IOError from deep inside the config)."""
    config = _CONFIG.value
    if config is None:
        return None
    try:
        config.get("")  # an unloadable config file raises on its first read
    except IOError as e:
        raise InputNotFound(f"--config {config_flags.get_config_filename(flags.FLAGS['config'])}: no such "
                            f"config file ({command} takes configs/<file>.py:<preset>)") from e
    return config


def demo() -> None:
    # 2 simulated devices, not 8: still data-parallel with ITC's cross-device gather, and on a 2-core
    # CPU 8 devices only wait on each other (measured, stage 1 alone: 0.235 s a step on 8, 0.185 on 1
    # or 2; the whole demo 13.0 min against 14.7 on the same AVX2 EPYC, ITC 0.955, VQA 0.808)
    _simulated_cpu_devices(2)
    # pylint: disable=import-outside-toplevel
    from blip2_jax.demo import configs
    from blip2_jax.demo import run as demo_run

    logging.set_verbosity(logging.WARNING)
    results = demo_run.run(_WORKDIR.value or configs.DEFAULT_WORKDIR)
    print(demo_run.table(results))


def train() -> None:
    # pylint: disable=import-outside-toplevel  # keep --help fast
    from blip2_jax.convert.model_checkpoint import absolute
    from blip2_jax.train import loop
    from blip2_jax.train.validate import check_train_config

    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO; steps print to stdout
    config = _config("train")
    if config is None or not _WORKDIR.value:
        raise app.UsageError(f"train needs --config and --workdir\n{_usage('train')}")
    check_train_config(config)  # the device checks follow once JAX is up (loop.train)
    if _COORDINATOR.value:
        config.distributed.update(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                                  process_id=_PROCESS_ID.value)
    for field in ("hf", "checkpoint", "stage1"):  # Orbax reads these (hub ids and URLs stay as given)
        if os.path.exists(config.init[field]):
            config.init[field] = absolute(config.init[field])
    loop.train(config, absolute(_WORKDIR.value))


def _search_config(preset):
    """`preset` with the search flags given; a --max_new_tokens below the preset's min_length lowers
    min_length to it (else EOS stays forbidden to the end and every text runs to the maximum)."""
    overrides = {k: f.value for k, f in _SEARCH.items() if f.value is not None}
    if overrides.get("semantics") == "transformers":  # LAVIS's min_len has no meaning there
        overrides.setdefault("min_length", 0)
    if "max_new_tokens" in overrides:
        overrides.setdefault("min_length", min(preset.min_length, overrides["max_new_tokens"]))
    return dataclasses.replace(preset, **overrides)


def generate() -> None:
    # pylint: disable=import-outside-toplevel  # keep --help fast
    from blip2_jax.data.images import check_image_file
    from blip2_jax.generation.api import Blip2Generator, check_question_template
    from blip2_jax.generation.config import CAPTION, VQA_OPT, VQA_T5
    from blip2_jax.models.config import T5Config

    if not _CHECKPOINT.value or not _IMAGES.value:
        raise app.UsageError(f"generate needs --checkpoint and at least one --image\n{_usage('generate')}")
    for image in _IMAGES.value:  # before the model loads
        check_image_file(image)
    if _QUESTIONS.value and _PROMPT.value is not None:
        check_question_template(_PROMPT.value)
    _search_config(CAPTION)  # the flags' own checks, before the model loads
    generator = Blip2Generator.from_pretrained(_CHECKPOINT.value, dtype=_DTYPE.value, batch_size=_BATCH_SIZE.value)
    if _QUESTIONS.value:
        preset = VQA_T5 if isinstance(generator.config.text, T5Config) else VQA_OPT
        questions = _QUESTIONS.value[0] if len(_QUESTIONS.value) == 1 else _QUESTIONS.value
        texts = generator.answer(_IMAGES.value, questions, _PROMPT.value, _search_config(preset))
    else:
        texts = generator.caption(_IMAGES.value, _PROMPT.value or "", _search_config(CAPTION))
    for path, text in zip(_IMAGES.value, texts):
        print(f"{path}\t{text}")


def data_build() -> None:
    from blip2_jax.data import sources  # pylint: disable=import-outside-toplevel  # keep --help fast

    if not _ANNOTATIONS.value or not _IMAGE_ROOT.value or not _OUTPUT.value:
        raise app.UsageError(f"data build needs --annotations, --image_root and --output\n{_usage('data build')}")
    source = sources.JsonSource(_ANNOTATIONS.value, _IMAGE_ROOT.value)
    paths, missing = sources.write_array_records(source, _OUTPUT.value, _NUM_SHARDS.value)
    print(f"wrote {len(source) - len(missing)} records to {len(paths)} shards listed in "
          f"{sources.manifest_path(_OUTPUT.value)}; {len(missing)} left out (image file missing)")


def plan() -> None:
    import math

    # pylint: disable=import-outside-toplevel
    from blip2_jax.train import plan as plan_lib
    from blip2_jax.train.validate import check_train_config

    config = _config("plan")
    if config is None:
        raise app.UsageError(f"plan needs --config\n{_usage('plan')}")
    if _BATCH.value is not None:
        config.batch_size = _BATCH.value
    check_train_config(config)  # --mesh replaces config.mesh: make_plan checks the batch against it
    mesh = plan_lib.parse_mesh(_MESH.value)
    need = math.prod(mesh.values())  # one simulated device per mesh position, up to a limit
    _simulated_cpu_devices(need if need <= plan_lib.MAX_SIMULATED_DEVICES else need // mesh["data"])
    print(plan_lib.make_plan(config, mesh).report(config.stage, _DEVICE_KIND.value))


def evaluate() -> None:
    import json

    from blip2_jax.evaluate.run import evaluate as run_eval  # pylint: disable=import-outside-toplevel

    logging.set_verbosity(logging.WARNING)
    config = _config("eval")
    if config is None or not _OUT.value:
        raise app.UsageError(f"eval needs --config and --out\n{_usage('eval')}")
    if _CHECKPOINT.value:
        config.checkpoint = _CHECKPOINT.value
    if _STEP.value is not None:
        config.step = _STEP.value
    scores = run_eval(config, _OUT.value)  # checks the config before it loads anything (train/validate.py)
    print(json.dumps(scores, indent=2))
    print(f"wrote {_OUT.value}/results.json and {_OUT.value}/metrics.json")


def _progress(total: int, what: str):
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=what)


def convert(direction: str) -> None:
    # pylint: disable=import-outside-toplevel  # keep --help fast
    import numpy as np

    from blip2_jax.convert import hf_export, lavis, model_checkpoint
    from blip2_jax.models import presets

    needs = {"from-hf": ("src", "out"), "to-hf": ("checkpoint", "out"), "from-lavis": ("src", "model", "out"),
             "to-lavis": ("checkpoint", "out")}[direction]
    given = {"src": _SRC.value, "out": _OUT.value, "checkpoint": _CHECKPOINT.value, "model": _MODEL.value}
    absent = [f"--{n}" for n in needs if not given[n]]
    if absent:
        raise app.UsageError(f"convert {direction} needs {', '.join(absent)}\n{_usage(f'convert {direction}')}")
    if direction == "from-hf":
        with _progress(0, "from-hf") as bar:
            out = hf_export.from_hf(_SRC.value, _OUT.value, dtype=_DTYPE.value, progress=bar.update)
    elif direction == "from-lavis":
        with _progress(0, "from-lavis") as bar:
            out, notes = lavis.from_lavis(_SRC.value, _OUT.value, presets.get(_MODEL.value), vision=_VISION.value,
                                          text=_TEXT.value, dtype=_DTYPE.value, progress=bar.update)
        print("\n".join(notes))
    elif direction == "to-hf":
        params = model_checkpoint.CheckpointParams.open(_CHECKPOINT.value, _STEP.value)
        total = sum(int(np.prod(s)) * np.dtype(_DTYPE.value or d).itemsize for s, d in params.shapes.values())
        with _progress(total, "to-hf") as bar:
            hf_export.to_hf(params, _OUT.value, dtype=_DTYPE.value, tokenizer=_TOKENIZER.value,
                            max_shard_size=_MAX_SHARD.value, progress=bar.update)
        print(f"wrote {_OUT.value}")
        return
    else:
        print("\n".join(lavis.to_lavis(_CHECKPOINT.value, _OUT.value, step=_STEP.value, vision_out=_VISION_OUT.value,
                                       dtype=_DTYPE.value)))
        print(f"wrote {_OUT.value}")
        return
    print(f"wrote {_OUT.value}: {out.architecture}, {len(out.shapes)} arrays, {out.nbytes / 2**20:.1f} MiB")


def main(argv: list[str]) -> None:
    commands = {("demo",): demo, ("train",): train, ("generate",): generate, ("data", "build"): data_build,
                ("plan",): plan, ("eval",): evaluate,
                **{("convert", d): functools.partial(convert, d) for d in ("from-hf", "to-hf", "from-lavis",
                                                                           "to-lavis")}}
    if tuple(argv[1:]) not in commands:
        given = " ".join(argv[1:])
        raise app.UsageError(f"{f'unknown command {given!r}' if given else 'no command given'}\n{USAGE}")
    commands[tuple(argv[1:])]()


def _fail(message: str) -> None:
    """A user error: its message on stderr, exit code 2 (as argparse does)."""
    sys.stdout.flush()
    sys.stderr.write(f"blip2-jax: error: {message}\n")
    raise SystemExit(2)


def _innermost_user_error(error: BaseException) -> UserError | None:
    """The UserError that started `error`'s chain: ml_collections re-raises an error from a config
    file's get_config with the traceback as its message, and absl wraps that once more."""
    found = None
    while error is not None:
        if isinstance(error, UserError):
            found = error
        error = error.__cause__ or error.__context__
    return found


def _unknown_config_field(error: BaseException, argv: list[str]) -> str | None:
    """The `--config.x.y=v` whose field does not exist, when that is what `error` is (ml_collections
    raises a raw AttributeError or KeyError from resolving the override's path)."""
    if not isinstance(error, (AttributeError, KeyError)):
        return None
    if not any(frame.filename.endswith("config_path.py") for frame in traceback.extract_tb(error.__traceback__)):
        return None
    name = str(error).strip("\"'")
    overrides = [a.lstrip("-") for a in argv if a.lstrip("-").startswith("config.")]
    return next((a for a in overrides if name in a.split("=", 1)[0].split(".")), f"config.{name}")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with a bad flag, flag value or config override reported as a user error.
    A config file that fails to load for any other reason is a bug and keeps its traceback."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # pylint: disable=broad-except  # classified below; the rest re-raised
        user = _innermost_user_error(e)
        if user is not None:
            _fail(str(user))
        field = _unknown_config_field(e, argv)
        if field is not None:
            _fail(f"--{field}: the config has no field {field.split('=', 1)[0].removeprefix('config.')!r}")
        if isinstance(e, flags.Error) and "Error whilst parsing config file" not in str(e):
            _fail(str(e))
        raise


def _run_main(argv: list[str]) -> None:
    try:
        main(argv)
    except (UserError, app.UsageError) as e:
        _fail(str(e))


def exit_on_sigterm_until_replaced() -> None:
    """SIGTERM exits 0 at once until something else (the training loop's preemption handler) takes
    the signal over. A Python handler alone would wait for the main thread to leave a compile; the
    signal's wakeup fd wakes a thread instead, which exits while the handler is still this one."""

    def startup(signum, frame):  # noqa: ARG001  # the thread below does the work
        del signum, frame

    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)

    def watch():
        while True:
            received = os.read(read_fd, 64)
            if signal.SIGTERM in received and signal.getsignal(signal.SIGTERM) is startup:
                sys.stdout.flush()
                os._exit(0)  # pylint: disable=protected-access  # nothing trained yet: nothing to save

    threading.Thread(target=watch, daemon=True, name="sigterm-at-startup").start()
    signal.signal(signal.SIGTERM, startup)
    signal.set_wakeup_fd(write_fd)


def run() -> None:
    from blip2_jax.data.pipeline import limit_malloc_arenas  # pylint: disable=import-outside-toplevel

    # Before any thread allocates: keeps a long input pipeline's memory flat. Not for the demo: its
    # 64 px images need no cap, and 2 arenas slowed its 8-device CPU steps by half (0.21 s vs 0.14 s).
    if sys.argv[1:2] != ["demo"]:
        limit_malloc_arenas()
    if sys.argv[1:2] == ["train"]:
        exit_on_sigterm_until_replaced()
    app.run(_run_main, flags_parser=parse_flags)
