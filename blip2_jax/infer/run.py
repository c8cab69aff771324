"""Captions, answers or features for a whole set of records, shard by shard (`infer/shards.py`).

Each shard's images are read first: one that cannot be read is skipped, counted and listed in the
shard's `.bad.json`, never fatal. The rest are captioned or answered over every device of the mesh
(`evaluate/generation.py`: one compile, outputs bit-identical on any mesh) or embedded
(`features.py`). Texts go to Parquet (`id`, `caption` or `id`, `question`, `answer`), features to
`.npy` with the row ids in `.ids.json`. `run.json` records what the output holds; a rerun with
other settings into the same directory is refused rather than mixed with it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from blip2_jax.data.sources import read_image
from blip2_jax.data.text import pre_question
from blip2_jax.errors import UserError
from blip2_jax.evaluate.model import generation_tokenizers, load_model
from blip2_jax.generation.config import GenerationConfig
from blip2_jax.infer.shards import Shards, write_atomic
from blip2_jax.parallel import mesh as mesh_lib

TASKS = ("caption", "answer", "embed")


def _write_json(path: Path, value: Any) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(value, indent=1)))


def _write_parquet(path: Path, columns: dict[str, list]) -> None:
    import pyarrow as pa  # pylint: disable=import-outside-toplevel
    from pyarrow import parquet as pq  # pylint: disable=import-outside-toplevel

    write_atomic(path, lambda tmp: pq.write_table(pa.table(columns), tmp))


def _claim(out: Path, settings: dict[str, Any]) -> None:
    """`out` holds this run's output or none: a different earlier run there is refused."""
    run_file = out / "run.json"
    if run_file.is_file():
        earlier = json.loads(run_file.read_text())
        if earlier != settings:
            changed = sorted(k for k in set(earlier) | set(settings) if earlier.get(k) != settings.get(k))
            raise UserError(f"--out {out} holds the output of another run (differs in {', '.join(changed)}); "
                            "choose another --out or remove it")
    elif jax.process_index() == 0:
        _write_json(run_file, settings)


class _Texts:
    """Captions or answers from a stage-2 checkpoint over the mesh."""

    def __init__(self, checkpoint: str, mesh, *, step, tokenizer: str, dtype, generation: GenerationConfig,
                 batch_size: int):
        self.mesh, self.generation, self.batch_size = mesh, generation, batch_size
        self.model = load_model(checkpoint, mesh, step=step, dtype=dtype)
        if self.model.config.text is None:
            raise UserError(f"{checkpoint} is a retrieval model: captions and answers need a stage-2 checkpoint")
        self.tokenizers = generation_tokenizers(self.model, tokenizer)

    def __call__(self, images: list, prompts: list[str]) -> list[str]:
        from blip2_jax.evaluate.generation import generate_texts  # pylint: disable=import-outside-toplevel

        return generate_texts(self.model, self.mesh, images, prompts, config=self.generation,
                              batch_size=self.batch_size, **self.tokenizers)


def infer(task: str, records: Sequence[dict[str, Any]], checkpoint: str, out: str | Path, *,
          step: int | None = None, tokenizer: str = "", prompt: str = "", generation: GenerationConfig | None = None,
          feature: str = "itc_image", batch_size: int = 8, shard_size: int = 256, num_devices: int = -1,
          dtype: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Run `task` over `records` into `out`; returns what was done (shards written and skipped,
    images, bad images, seconds, images/s)."""
    if task not in TASKS:
        raise UserError(f"infer tasks: {', '.join(TASKS)}; got {task!r}")
    if shard_size < 1 or batch_size < 1:
        raise UserError(f"--shard_size and --batch_size must be >= 1, got {shard_size} and {batch_size}")
    if task == "answer" and "{}" not in prompt:
        raise UserError(f"--prompt {prompt!r}: answers need a template with {{}} where the question goes")
    if task != "embed" and importlib.util.find_spec("pyarrow") is None:
        raise UserError("captions and answers are written as Parquet: pip install -e '.[infer]' (pyarrow)")
    if task == "embed":  # the feature must exist in this model: checked from its metadata, before any output
        from blip2_jax import features  # pylint: disable=import-outside-toplevel
        from blip2_jax.models import blip2  # pylint: disable=import-outside-toplevel
        from blip2_jax.weights.load import open_source  # pylint: disable=import-outside-toplevel

        source = open_source(checkpoint, step)
        features.check_feature(blip2.build(source.config, source.architecture), feature)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards = Shards(out, len(records), shard_size, ".npy" if task == "embed" else ".parquet")
    settings = {"task": task, "checkpoint": str(checkpoint), "step": step, "records": len(records),
                "shard_size": shard_size, "ids_sha": _ids_digest(records),
                **({"feature": feature} if task == "embed" else
                   {"prompt": prompt, "generation": dataclasses.asdict(generation or GenerationConfig())})}
    _claim(out, settings)
    shards.clear_partial()
    todo = [k for k in range(len(shards)) if not shards.done(k)]
    summary = {"shards": len(shards), "skipped_shards": len(shards) - len(todo), "images": 0, "bad_images": 0}
    if not todo:
        return {**summary, "seconds": 0.0, "images_per_s": 0.0}
    devices = jax.devices() if num_devices == -1 else jax.devices()[:num_devices]
    mesh = mesh_lib.make_mesh(-1, 1, 1, devices)
    if task == "embed":
        from blip2_jax.features import FeatureExtractor  # pylint: disable=import-outside-toplevel

        extractor = FeatureExtractor.from_pretrained(checkpoint, step=step, batch_size=batch_size, dtype=dtype)
        run = None
    else:
        run = _Texts(checkpoint, mesh, step=step, tokenizer=tokenizer, dtype=dtype,
                     generation=generation or GenerationConfig(), batch_size=batch_size)
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel

    done_rows = sum(len(shards.rows(k)) for k in range(len(shards)) if k not in todo)
    bar = tqdm(total=len(records), initial=done_rows, unit="img", desc=task,
               disable=not progress or jax.process_index() != 0)
    start = time.perf_counter()
    for k in todo:
        rows = [records[i] for i in shards.rows(k)]
        good, images, bad = [], [], []
        for record in rows:
            try:
                images.append(read_image(record["image"]))
                good.append(record)
            except (OSError, ValueError) as e:  # unreadable, truncated, not an image
                bad.append({"id": record["id"], "image": str(record["image"]), "cause": str(e)})
        if task == "embed":
            result = extractor.images(images, feature) if images else np.zeros((0,), np.float32)
        else:
            prompts = [prompt.format(pre_question(r["question"])) if task == "answer" else prompt for r in good]
            result = run(images, prompts) if images else []
        if jax.process_index() == 0:
            _write_shard(shards, k, task, good, result, bad)
        summary["images"] += len(good)
        summary["bad_images"] += len(bad)
        bar.update(len(rows))
    bar.close()
    seconds = time.perf_counter() - start
    return {**summary, "seconds": seconds, "images_per_s": summary["images"] / seconds if seconds else 0.0}


def _write_shard(shards: Shards, k: int, task: str, good: list[dict], result: Any, bad: list[dict]) -> None:
    """The shard's companions first, its data file last (`Shards.done` looks for that one)."""
    if bad:
        _write_json(shards.path(k, ".bad.json"), bad)
    ids = [r["id"] for r in good]
    if task == "embed":
        _write_json(shards.path(k, ".ids.json"), ids)
        write_atomic(shards.path(k), lambda tmp: _save_npy(tmp, np.asarray(result, np.float32)))
    elif task == "caption":
        _write_parquet(shards.path(k), {"id": ids, "caption": list(result)})
    else:
        _write_parquet(shards.path(k), {"id": ids, "question": [r["question"] for r in good], "answer": list(result)})


def _save_npy(path: Path, array: np.ndarray) -> None:
    with path.open("wb") as f:  # a file object: np.save would append ".npy" to the temporary name
        np.save(f, array)


def _ids_digest(records: Sequence[dict[str, Any]]) -> str:
    """A digest of the record ids in order: a rerun over another set is refused, not mixed in."""
    return hashlib.sha256("\n".join(str(r["id"]) for r in records).encode()).hexdigest()[:16]
