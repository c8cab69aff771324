"""What a long training run shows and writes besides its checkpoints (issue 20): the progress bar,
a `jax.profiler` trace of the steps named in `log.profile_steps`, and Weights & Biases logs (offline
here), the last two through `blip2-jax train` as a user runs it."""
import gzip
import io
import json
import pathlib
import struct
import sys

import pytest

from blip2_jax.errors import UserError
from blip2_jax.train.profiling import parse_steps
from blip2_jax.train.progress import Progress

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_progress_bar_shows_step_throughput_and_time_left(capsys):
    bar_file = io.StringIO()
    progress = Progress(20, 5, enabled=True, file=bar_file)  # resumed at step 5
    for _ in range(3):
        progress.step()
    progress.show({"images_per_s": 123.4, "loss": 2.5})
    progress.write("step 8 | loss=2.5")
    progress.close()
    bar = bar_file.getvalue()
    assert "step 5/20" in bar and "step 8/20" in bar and "40%" in bar
    assert "123.4 images/s, loss 2.5" in bar and "<" in bar  # [elapsed<remaining, ...]
    assert capsys.readouterr().out == "step 8 | loss=2.5\n"  # the metric line on stdout, not in the bar
    quiet = io.StringIO()
    off = Progress(20, 0, enabled=False, file=quiet)  # not process 0, or log.progress=False
    off.step()
    off.write("step 1 | loss=3")
    off.close()
    assert quiet.getvalue() == "" and capsys.readouterr().out == "step 1 | loss=3\n"


@pytest.mark.parametrize("value,expected", [("", None), ("2,5", (2, 5)), ("7,7", (7, 7)), ("1,20", (1, 20))])
def test_profile_steps_parse(value, expected):
    assert parse_steps(value, 20) == expected


@pytest.mark.parametrize("value", ["0,3", "5,2", "3,21", "4", "a,b", "1,2,3"])
def test_profile_steps_outside_the_run_are_refused(value):
    with pytest.raises(UserError, match=rf"1 <= A <= B <= total_steps \(20\), got '{value}'"):
        parse_steps(value, 20)


@pytest.fixture
def fresh_wandb():
    """wandb keeps its settings (the mode among them) in a process-wide singleton from the first
    `wandb.init`: each test that starts a run gets a fresh one, as a `blip2-jax train` process does."""
    import wandb  # pylint: disable=import-outside-toplevel

    wandb.teardown()
    yield
    wandb.teardown()


def wandb_history(run_file: pathlib.Path) -> list[dict]:
    """The history rows of an offline W&B run file: LevelDB-log framing (32 KiB blocks, each record a
    7-byte header: CRC, length, FULL/FIRST/MIDDLE/LAST) around `Record` protobufs, after the
    file's own 7-byte ':W&B' header."""
    from wandb.proto import wandb_internal_pb2  # pylint: disable=import-outside-toplevel

    data, block, header = run_file.read_bytes(), 32768, 7
    assert data[:4] == b":W&B", data[:8]
    rows, pos, pending = [], header, b""
    while pos + header <= len(data):
        if block - pos % block < header:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + header])
        if length == kind == 0:
            break
        pending, pos = pending + data[pos + header:pos + header + length], pos + header + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({".".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item})
    return rows


def test_train_writes_a_profile_of_the_named_steps_and_wandb_logs(blip2_jax, fresh_wandb, tmp_path, monkeypatch):
    """`blip2-jax train` with `log.profile_steps=2,2` and `log.wandb=True` (offline): the trace holds
    step 2's execution and no other, and the W&B run holds every logged step's metrics as
    metrics.jsonl has them. The run is `tests/test_train.py:train_tiny_stage1`'s, so its compile is
    shared through the persistent cache."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    workdir = tmp_path / "run"
    code, out, err = blip2_jax(
        "train", "--config", f"{ROOT}/configs/stage1.py:tiny", "--workdir", str(workdir), "--config.total_steps=2",
        "--config.optim.warmup_steps=1", "--config.mesh.num_devices=1", "--config.mesh.data=1",
        "--config.checkpoint.every=1", "--config.checkpoint.async_save=False", "--config.log.tensorboard=False",
        "--config.log.profile_steps=2,2", "--config.log.wandb=True")
    assert code == 0 and "step 2 |" in out, err

    traces = list((workdir / "profile" / "plugins" / "profile").glob("*/*.trace.json.gz"))
    assert traces, list(workdir.rglob("*"))
    events = [e for t in traces for e in json.load(gzip.open(t))["traceEvents"] if e.get("ph") == "X"]
    calls = [(e["ts"], e["ts"] + e["dur"]) for e in events if e["name"] == "PjitFunction(train_step)"]
    outermost = [c for c in calls if not any(o != c and o[0] <= c[0] and c[1] <= o[1] for o in calls)]
    assert len(outermost) == 1, calls  # step 2's dispatch (traced at two nested levels), not step 1's

    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    (run_file,) = (workdir / "wandb").glob("offline-run-*/run-*.wandb")
    history = wandb_history(run_file)
    assert [row["_step"] for row in history] == [row["step"] for row in logged] == [1, 2]
    for ours, theirs in zip(logged, history):
        assert {k: theirs[k] for k in ours if k != "step"} == {k: v for k, v in ours.items() if k != "step"}
    assert run_file.name == f"run-{(workdir / 'wandb_run_id').read_text()}.wandb"  # a resume finds the run


def test_wandb_without_the_package_is_refused_before_anything_runs(blip2_jax, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    code, _, err = blip2_jax("train", "--config", f"{ROOT}/configs/stage1.py:tiny", "--workdir", str(tmp_path / "w"),
                             "--config.log.wandb=True")
    assert code == 2 and "blip2-jax: error: config.log.wandb=True needs the wandb package" in err, err
    assert not (tmp_path / "w").exists()


def test_wandb_without_a_login_is_one_line_before_the_model_is_built(blip2_jax, fresh_wandb, tmp_path, monkeypatch):
    """Online W&B with no API key anywhere: wandb's UsageError becomes exit 2 and one line, raised
    before the model is built or a checkpoint written."""
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a key
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    workdir = tmp_path / "w"
    code, _, err = blip2_jax("train", "--config", f"{ROOT}/configs/stage1.py:tiny", "--workdir", str(workdir),
                             "--config.log.wandb=True")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("blip2-jax: error: config.log.wandb=True: W&B could not start a run in project 'blip2_jax'")
    assert not any((workdir / "checkpoints").glob("*"))
    assert not (workdir / "frozen").exists()
