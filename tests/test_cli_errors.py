"""`blip2-jax` on bad input, run as the console script runs it (`cli.run` on `sys.argv`): every config
error is one or two lines naming the field, exit code 2, before a workdir or a compile exists;
relative paths reach Orbax as absolute ones; over-long generation is refused where `transformers`
fails too; SIGTERM during start-up exits 0 at once."""
import dataclasses
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from flax import traverse_util

from blip2_jax import cli
from blip2_jax.cli.inference import search_config
from blip2_jax.errors import UserError
from blip2_jax.generation.api import Blip2Generator
from blip2_jax.generation.config import CAPTION, GenerationConfig
from blip2_jax.weights import model_checkpoint
from blip2_jax.weights.hf_checkpoint import load_pretrained
from blip2_jax.weights.hf_names import CheckpointMismatchError
from tests.reference import hf_models as ref
from tests.reference.tokenizers import tiny_opt_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = f"{ROOT}/configs/stage2_opt.py:tiny"


def user_error(code: int, err: str) -> str:
    """The message of a user error, after checking its form: exit 2, one or two lines, no traceback."""
    lines = err.strip().splitlines()
    assert code == 2, err
    assert 1 <= len(lines) <= 2 and lines[0].startswith("blip2-jax: error: "), err
    return err


@pytest.mark.parametrize("override,expected", [
    ("--config.batch_size=0", "config.batch_size must be an integer >= 1, got 0"),
    ("--config.batch_size=-8", "config.batch_size must be an integer >= 1, got -8"),
    ("--config.batch_size=12", "config.batch_size 12 must be a multiple of the 8 devices"),  # 8 simulated devices
    ("--config.mesh.tensor=0", "config.mesh.tensor must be an integer >= 1, got 0"),
    ("--config.mesh.fsdp=3", "config.mesh.fsdp x tensor = 3 x 1 must divide the 8 devices"),
    ("--config.mesh.num_devices=100", "config.mesh.num_devices is 100, but only 8 are visible"),
    ("--config.checkpoint.every=0", "config.checkpoint.every must be an integer >= 1, got 0"),
    ("--config.log.every=0", "config.log.every must be an integer >= 1, got 0"),
    ("--config.log.profile_steps=3,30", "config.log.profile_steps must be 'A,B' with 1 <= A <= B <= total_steps (20)"),
    ("--config.model.qformer.num_attention_heads=5", "config.model.qformer.num_attention_heads: hidden size 32"),
    ("--config.optim.lr=-0.001", "config.optim.lr must be a number >= 0, got -0.001"),
    ("--config.total_steps=5", "config.optim.schedule 'cosine' needs total_steps > warmup_steps=5"),
    ("--config.trainable=bogus", "config.trainable must be one of finetune_stage1"),
    ("--config.data.source=bogus", "config.data.source must be one of synthetic, json"),
    ("--config.data.read_threads=-1", "config.data.read_threads must be an integer >= 0, got -1"),
    ("--config.data.mixture_balance=cubic", "config.data.mixture_balance must be one of size, sqrt"),
    ("--config.data.templates=flan", "config.data.templates must be '' or 'instructblip'; got 'flan'"),
    ("--config.init.bert=bert-base-uncased", "init.bert initialises a stage-1 Q-Former; stage 2 starts from init.stage1"),
    ("--config.foo=1", "--config.foo=1: the config has no field 'foo'"),
    ("--config.optim.foo=1", "--config.optim.foo=1: the config has no field 'optim.foo'"),
    ("--config.batch_size=abc", "--config.batch_size=abc: invalid literal for int()"),
])
def test_train_config_errors_are_one_line_before_anything_runs(blip2_jax, tmp_path, override, expected):
    code, _, err = blip2_jax("train", "--config", TINY, "--workdir", str(tmp_path / "w"), override)
    assert expected in user_error(code, err)
    assert not (tmp_path / "w").exists()  # the checkpoint manager, made before the first compile, never was


@pytest.mark.parametrize("args,expected", [
    (["train", "--config", f"{ROOT}/configs/stage2_opt.py:nope", "--workdir", "w"],
     "stage-2 presets: ['opt2.7b', 'opt6.7b', 'tiny']; got 'nope'"),
    (["train", "--config", f"{ROOT}/configs/nothere.py:tiny", "--workdir", "w"], "nothere.py:tiny: no such config"),
    (["train", "--config", TINY], "train needs --config and --workdir"),
    (["train", "--no_such_flag"], "Unknown command line flag 'no_such_flag'"),
    (["plan", "--config", f"{ROOT}/configs/stage1.py:tiny", "--mesh", "data=3"],
     "config.batch_size 8 must be a multiple of the 3 devices of --mesh's data x fsdp axes"),
    (["plan", "--config", f"{ROOT}/configs/stage1.py:tiny", "--config.batch_size=0"], "config.batch_size must be"),
    (["plan", "--config", f"{ROOT}/configs/stage1.py:tiny", "--mesh", "data=0"], "--mesh takes data=D"),
    (["eval", "--config", f"{ROOT}/configs/eval/caption.py:coco_opt2.7b", "--out", "o", "--config.fsdp=0"],
     "config.fsdp must be an integer >= 1, got 0"),
    (["eval", "--config", f"{ROOT}/configs/eval/caption.py:coco_opt2.7b", "--out", "o",
      "--config.generation.num_beams=0"], "num_beams and num_return_sequences must be >= 1"),
    (["convert", "to-hf", "--src", "nothere", "--out", "x"], "nothere is neither a model checkpoint"),
    (["train", "--config", f"{ROOT}/configs/instruct.py:tiny", "--workdir", "w", "--config.data.source=easy_vqa"],
     "config.data.instruction_tokenizer: an InstructBLIP run's records need the Q-Former's BERT tokenizer"),
])
def test_plan_eval_convert_errors_are_one_line(blip2_jax, tmp_path, monkeypatch, args, expected):
    monkeypatch.chdir(tmp_path)
    code, _, err = blip2_jax(*args)
    assert expected in user_error(code, err)
    assert not any(tmp_path.iterdir())


def test_a_bug_keeps_its_traceback(blip2_jax, monkeypatch):
    """Only our own user errors are one line: an exception from anywhere else propagates."""
    def broken(values):
        raise ValueError(f"an internal bug ({values.workdir})")

    monkeypatch.setitem(cli.COMMANDS, ("demo",), dataclasses.replace(cli.COMMANDS[("demo",)], run=broken))
    with pytest.raises(ValueError, match="an internal bug"):
        blip2_jax("demo")


@pytest.mark.slow  # one compile of the tiny stage 2: ~40 s on 2 shared cores
def test_relative_workdir_trains(blip2_jax, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = blip2_jax("train", "--config", TINY, "--workdir", "relwd", "--config.total_steps=1",
                             "--config.optim.warmup_steps=0", "--config.mesh.num_devices=1",
                             "--config.log.tensorboard=False")
    assert code == 0, err
    assert [p.name for p in (tmp_path / "relwd" / "checkpoints").iterdir() if p.name.isdigit()] == ["1"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random HF BLIP-2 OPT (64 positions, 10 queries) with its tokenizer, and a png."""
    directory = tmp_path_factory.mktemp("blip2_opt")
    ref.generation_model(ref.OPT, seed=1).save_pretrained(directory)
    tiny_opt_tokenizer().save_pretrained(directory)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(directory / "a.png")
    return directory


def test_relative_convert_paths(blip2_jax, hf_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = blip2_jax("convert", "from-hf", "--src", str(hf_dir), "--out", "x/y")
    assert code == 0, err
    code, _, err = blip2_jax("convert", "to-hf", "--src", "x/y", "--out", "h")
    assert code == 0, err
    assert transformers.Blip2ForConditionalGeneration.from_pretrained(tmp_path / "h").config.num_query_tokens == 10


def test_generate_reads_a_model_checkpoint_as_it_reads_the_hf_directory(blip2_jax, hf_dir, tmp_path):
    """`generate --checkpoint` takes what `weights.load` reads: the model checkpoint `from-hf` made of
    the HF directory captions as the directory does. Without a tokenizer it needs `--tokenizer`, and
    a checkpoint without an LLM is refused; both before any weight is read."""
    ref.retrieval_model(seed=1).save_pretrained(tmp_path / "retrieval")
    tiny_opt_tokenizer().save_pretrained(tmp_path / "retrieval")
    args = ("--image", str(hf_dir / "a.png"), "--max_new_tokens", "5")
    code, expected, err = blip2_jax("generate", "--checkpoint", str(hf_dir), *args)
    assert code == 0 and expected.count("\t") == 1, err
    assert blip2_jax("convert", "from-hf", "--src", str(hf_dir), "--out", str(tmp_path / "ckpt"))[0] == 0
    code, out, err = blip2_jax("generate", "--checkpoint", str(tmp_path / "ckpt"), *args)
    assert (code, out) == (0, expected), err
    for name in os.listdir(tmp_path / "ckpt"):
        if name not in ("params", model_checkpoint.METADATA):  # the tokenizer files from-hf copied
            os.remove(tmp_path / "ckpt" / name)
    assert f"{tmp_path / 'ckpt'} names no tokenizer" in user_error(
        *blip2_jax("generate", "--checkpoint", str(tmp_path / "ckpt"), *args)[::2])
    code, out, err = blip2_jax("generate", "--checkpoint", str(tmp_path / "ckpt"), "--tokenizer", str(hf_dir), *args)
    assert (code, out) == (0, expected), err
    assert "holds Blip2ForImageTextRetrieval weights; captions and answers need a stage-2 checkpoint" in user_error(
        *blip2_jax("generate", "--checkpoint", str(tmp_path / "retrieval"), *args)[::2])


def test_generate_input_errors_are_one_line(blip2_jax, hf_dir):
    png = str(hf_dir / "a.png")
    for args, expected in [
        (["--image", str(hf_dir)], f"image {hf_dir} is a directory"),
        (["--image", png, "--question", "what?", "--prompt", "a {b"], "must hold exactly one {} where the question"),
        (["--image", png, "--question", "what?", "--prompt", "a {} {}"], "must hold exactly one {}"),
        (["--image", png, "--max_new_tokens", "100000"], "max_new_tokens 100000 is too many"),
        (["--image", png, "--num_beams", "0"], "num_beams and num_return_sequences must be >= 1"),
        (["--image", png, "--batch_size", "0"], "batch_size must be >= 1, got 0"),
        (["--image", png, "--image", png, "--question", "a?", "--question", "b?", "--question", "c?"],
         "got 3 questions for 2 images"),
    ]:
        code, _, err = blip2_jax("generate", "--checkpoint", str(hf_dir), *args)
        assert expected in user_error(code, err)


def test_a_max_below_the_presets_minimum_lowers_it(blip2_jax, hf_dir):
    """CAPTION's min_length is 8: --max_new_tokens 5 alone lowers it to 5 (EOS may end the text);
    an explicit --min_length is kept, and a larger max keeps the preset's."""
    for args, min_length in [(["--max_new_tokens", "5"], 5), (["--max_new_tokens", "20"], 8),
                             (["--max_new_tokens", "5", "--min_length", "7"], 7), ([], 8)]:
        _, values = cli.parse(["blip2-jax", "generate", *args])
        assert search_config(values, CAPTION).min_length == min_length
    code, out, err = blip2_jax("generate", "--checkpoint", str(hf_dir), "--image", str(hf_dir / "a.png"),
                               "--max_new_tokens", "5")
    assert code == 0 and out.startswith(str(hf_dir / "a.png") + "\t"), err


def test_generation_past_the_position_table_is_refused_as_transformers_does(hf_dir):
    """OPT has 64 positions, 10 of them for the queries; every new token but the last is fed back.
    With the room the prompt leaves, both we and `transformers` generate (the same text); one token
    more and transformers raises an IndexError while we refuse with the numbers, before running."""
    generator = Blip2Generator.from_pretrained(hf_dir, batch_size=1)
    prompt, png = "a photo of", str(hf_dir / "a.png")
    prompt_tokens = len(generator.tokenizer(prompt)["input_ids"])
    room = ref.OPT["max_position_embeddings"] - ref.NUM_QUERY_TOKENS - prompt_tokens + 1
    hf = transformers.Blip2ForConditionalGeneration.from_pretrained(hf_dir).eval()
    processor = transformers.Blip2Processor(transformers.BlipImageProcessorPil(size={"height": 30, "width": 30}),
                                            transformers.AutoTokenizer.from_pretrained(hf_dir),
                                            num_query_tokens=ref.NUM_QUERY_TOKENS)
    inputs = processor(images=[Image.open(png)], text=[prompt], return_tensors="pt")

    def hf_generate(new: int) -> str:  # EOS forbidden: every position is used
        with torch.no_grad():
            out = hf.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    assert generator.caption([png], prompt, GenerationConfig(max_new_tokens=room, min_new_tokens=room)) == \
        [hf_generate(room)]
    with pytest.raises(IndexError):
        hf_generate(room + 1)
    with pytest.raises(UserError, match=rf"10 image queries \+ the longest prompt \({prompt_tokens} tokens\) \+ "
                                        rf"{room} new tokens fed back need 65 positions, the language model has 64; "
                                        rf"pass max_new_tokens <= {room}"):
        generator.caption([png], prompt, GenerationConfig(max_new_tokens=room + 1, min_new_tokens=room + 1))


def test_sigterm_during_startup_exits_0_at_once(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    workdir = tmp_path / "w"
    proc = subprocess.Popen([sys.executable, "-m", "blip2_jax", "train", "--config", TINY, "--workdir", str(workdir)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (workdir / "checkpoints").exists():  # JAX is up and the model is being built and compiled
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()  # was -15
    assert time.monotonic() - sent < 10
    assert not [p for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]  # stopped before the loop


def test_weights_with_nan_are_refused_on_load_and_convert(blip2_jax, tmp_path):
    """A diverged run's NaN weights used to convert, load and caption (an empty caption, exit 0)."""
    model = ref.generation_model(ref.OPT, seed=3)
    with torch.no_grad():
        model.qformer.encoder.layer[1].output_query.dense.weight[2, 5] = float("nan")
    model.save_pretrained(tmp_path / "hf")
    name = "qformer.encoder.layer.1.output_query.dense.weight"
    with pytest.raises(CheckpointMismatchError, match=rf"{name} holds 1 NaN or Inf values"):
        load_pretrained(tmp_path / "hf")
    code, _, err = blip2_jax("convert", "from-hf", "--src", str(tmp_path / "hf"), "--out", str(tmp_path / "ours"))
    # The tensor is found while converting, after the progress bar started: the error is its last line.
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("blip2-jax: error: ") and name in last and "Traceback" not in err
    assert not (tmp_path / "ours").exists()

    # An Orbax model checkpoint holding Inf is refused when read (export, init.checkpoint, eval).
    with torch.no_grad():
        model.qformer.encoder.layer[1].output_query.dense.weight[2, 5] = 0.0
    model.save_pretrained(tmp_path / "finite")
    cfg, params = load_pretrained(tmp_path / "finite")
    leaves = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
    leaves["query_tokens"] = np.full_like(leaves["query_tokens"], np.inf)
    out = model_checkpoint.write(tmp_path / "inf", "Blip2ForConditionalGeneration", cfg, iter(leaves.items()),
                                 source="test")
    with pytest.raises(CheckpointMismatchError, match=r"query_tokens holds \d+ NaN or Inf values"):
        model_checkpoint.CheckpointParams.open(out).tree()
