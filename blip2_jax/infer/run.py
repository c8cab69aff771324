"""Captions, answers or features for a whole set of records, shard by shard (`infer/shards.py`).

Each shard's images are read first: one that cannot be read is skipped, counted and listed in the
shard's `.bad.json`, never fatal. The rest are captioned or answered over every device of the mesh
(`evaluate/generation.py`: one compile, outputs bit-identical on any mesh) or embedded
(`features.MeshFeatures`, the same), or recaptioned (`infer/capfilt.py`). Texts go to Parquet (`id`, `caption` or `id`,
`question`, `answer`; capfilt's columns in `capfilt.shard_columns`, and when every shard is written,
the annotation file `annotations.json` assembled from them), features to `.npy` with the row ids in
`.ids.json` (ITC features then also as one search index, `infer/index.py`). `run.json` records
what the output holds; a rerun with other settings into the same directory is refused rather than
mixed with it. With several processes every one computes every shard (its rows of each global
batch) and process 0 writes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np

from blip2_jax.data.sources import read_image
from blip2_jax.data.text import pre_question
from blip2_jax.errors import UserError
from blip2_jax.evaluate.model import generation_tokenizers, load_model
from blip2_jax.features import MeshFeatures
from blip2_jax.generation.config import GenerationConfig
from blip2_jax.infer import capfilt as capfilt_lib
from blip2_jax.infer.inputs import captions_of
from blip2_jax.infer.shards import Shards, write_atomic
from blip2_jax.parallel import mesh as mesh_lib

TASKS = ("caption", "answer", "embed", "capfilt")


def _write_json(path: Path, value: Any) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(value, indent=1)))


def _write_parquet(path: Path, columns: dict[str, list]) -> None:
    import pyarrow as pa  # pylint: disable=import-outside-toplevel
    from pyarrow import parquet as pq  # pylint: disable=import-outside-toplevel

    write_atomic(path, lambda tmp: pq.write_table(pa.table(columns), tmp))


def _read_parquet(path: Path) -> dict[str, list]:
    from pyarrow import parquet as pq  # pylint: disable=import-outside-toplevel

    return pq.read_table(path).to_pydict()


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
    """Captions or answers from a stage-2 checkpoint over the mesh, or a stage-1 one's captions."""

    def __init__(self, checkpoint: str, mesh, *, step, tokenizer: str, dtype, generation: GenerationConfig,
                 batch_size: int, answers: bool):
        self.mesh, self.generation, self.batch_size = mesh, generation, batch_size
        self.model = load_model(checkpoint, mesh, step=step, dtype=dtype)
        if self.model.config.text is None and answers:
            raise UserError(f"{checkpoint} is a retrieval model: answers need a stage-2 checkpoint")
        self.tokenizers = generation_tokenizers(self.model, tokenizer)

    def __call__(self, images: list, prompts: list[str], rngs: np.ndarray | None = None) -> list[str]:
        from blip2_jax.evaluate.generation import generate_texts  # pylint: disable=import-outside-toplevel

        return generate_texts(self.model, self.mesh, images, prompts, config=self.generation,
                              batch_size=self.batch_size, rngs=rngs, **self.tokenizers)


def infer(task: str, records: Sequence[dict[str, Any]], checkpoint: str, out: str | Path, *,
          step: int | None = None, tokenizer: str = "", prompt: str = "", generation: GenerationConfig | None = None,
          feature: str = "itc_image", capfilt: capfilt_lib.CapFiltConfig | None = None, batch_size: int = 8,
          shard_size: int = 256, num_devices: int = -1, dtype: str | None = None,
          progress: bool = True) -> dict[str, Any]:
    """Run `task` over `records` into `out`; returns what was done (shards written and skipped,
    images, bad images, seconds, images/s). capfilt samples with `generation` (which must sample),
    `capfilt.num_captions` per image."""
    if task not in TASKS:
        raise UserError(f"infer tasks: {', '.join(TASKS)}; got {task!r}")
    if shard_size < 1 or batch_size < 1:
        raise UserError(f"--shard_size and --batch_size must be >= 1, got {shard_size} and {batch_size}")
    if task == "answer" and "{}" not in prompt:
        raise UserError(f"--prompt {prompt!r}: answers need a template with {{}} where the question goes")
    if task != "embed" and importlib.util.find_spec("pyarrow") is None:
        raise UserError("texts are written as Parquet: pip install -e '.[infer]' (pyarrow)")
    if task == "embed":  # the feature must exist in this model: checked from its metadata, before any output
        from blip2_jax import features  # pylint: disable=import-outside-toplevel
        from blip2_jax.models import blip2  # pylint: disable=import-outside-toplevel
        from blip2_jax.weights.load import open_source  # pylint: disable=import-outside-toplevel

        source = open_source(checkpoint, step)
        features.check_feature(blip2.build(source.config, source.architecture), feature)
    if task == "capfilt":
        if capfilt is None or generation is None or not generation.do_sample:
            raise UserError("capfilt samples its captions: it needs a ranker and a sampling generation config")
        capfilt_lib.check_ranker(capfilt.ranker, None)
        generation = dataclasses.replace(generation, num_return_sequences=capfilt.num_captions)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards = Shards(out, len(records), shard_size, ".npy" if task == "embed" else ".parquet")
    settings = {"task": task, "checkpoint": str(checkpoint), "step": step, "records": len(records),
                "shard_size": shard_size, "ids_sha": _ids_digest(records),
                **({"feature": feature} if task == "embed" else
                   {"prompt": prompt, "generation": dataclasses.asdict(generation or GenerationConfig())}),
                **({"capfilt": dataclasses.asdict(capfilt)} if task == "capfilt" else {})}
    _claim(out, settings)
    if jax.process_index() == 0:
        shards.clear_partial()
    if jax.process_count() > 1:  # every process lists the same shards to do: none written before all look
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

        multihost_utils.sync_global_devices("infer: output directory claimed")
    todo = [k for k in range(len(shards)) if not shards.done(k)]
    summary = {"shards": len(shards), "skipped_shards": len(shards) - len(todo), "images": 0, "bad_images": 0}
    seconds = 0.0
    if todo:
        devices = jax.devices() if num_devices == -1 else jax.devices()[:num_devices]
        compute = _job(task, checkpoint, mesh_lib.make_mesh(-1, 1, 1, devices), step=step, tokenizer=tokenizer,
                       prompt=prompt, generation=generation, feature=feature, capfilt=capfilt, batch_size=batch_size,
                       dtype=dtype)
        seconds = _run_shards(task, records, shards, todo, summary, compute, progress=progress)
    if task == "capfilt" and jax.process_index() == 0:  # from the shards: the same bytes after a resume
        tables = [_read_parquet(shards.path(k)) for k in range(len(shards))]
        _write_json(out / capfilt_lib.ANNOTATIONS, capfilt_lib.annotations(tables))
    if task == "embed" and feature == "itc_image" and jax.process_index() == 0:  # text search's index
        from blip2_jax.infer.index import write_index  # pylint: disable=import-outside-toplevel

        write_index(shards, out, {"checkpoint": str(checkpoint), "step": step, "feature": feature})
    return {**summary, "seconds": seconds, "images_per_s": summary["images"] / seconds if seconds else 0.0}


def _job(task: str, checkpoint: str, mesh, *, step, tokenizer, prompt, generation, feature, capfilt, batch_size,
         dtype) -> Callable[[list[dict], list], Any]:
    """The models of `task`, loaded once, as a function of a shard's readable records and images."""
    if task == "embed":
        model = load_model(checkpoint, mesh, step=step, dtype=dtype)
        extractor = MeshFeatures(model.module, model.params, mesh, batch_size=batch_size)
        return lambda good, images: extractor.images(images, feature)
    run = _Texts(checkpoint, mesh, step=step, tokenizer=tokenizer, dtype=dtype,
                 generation=generation or GenerationConfig(), batch_size=batch_size, answers=task == "answer")
    if task != "capfilt":
        return lambda good, images: run(images, [prompt.format(pre_question(r["question"])) if task == "answer"
                                                 else prompt for r in good])
    ranker, n = capfilt_lib.Ranker(capfilt, mesh, batch_size), capfilt.num_captions

    def recaption(good: list[dict], images: list) -> list[dict]:
        sampled = run(images, [prompt] * len(good), capfilt_lib.image_keys([r["id"] for r in good], capfilt.seed))
        return ranker(images, [capfilt_lib.candidates(captions_of(r), sampled[j * n:(j + 1) * n])
                               for j, r in enumerate(good)])
    return recaption


def _run_shards(task: str, records: Sequence[dict[str, Any]], shards: Shards, todo: list[int], summary: dict,
                compute: Callable[[list[dict], list], Any], *, progress: bool) -> float:
    """Write the shards `todo`, counting into `summary`; returns the seconds it took."""
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
        result = compute(good, images) if images else (np.zeros((0,), np.float32) if task == "embed" else [])
        if jax.process_index() == 0:
            _write_shard(shards, k, task, good, result, bad)
        summary["images"] += len(good)
        summary["bad_images"] += len(bad)
        bar.update(len(rows))
    bar.close()
    return time.perf_counter() - start


def _write_shard(shards: Shards, k: int, task: str, good: list[dict], result: Any, bad: list[dict]) -> None:
    """The shard's companions first, its data file last (`Shards.done` looks for that one)."""
    if bad:
        _write_json(shards.path(k, ".bad.json"), bad)
    ids = [r["id"] for r in good]
    if task == "embed":
        _write_json(shards.path(k, ".ids.json"), ids)
        write_atomic(shards.path(k), lambda tmp: _save_npy(tmp, np.asarray(result, np.float32)))
    elif task == "capfilt":
        _write_parquet(shards.path(k), capfilt_lib.shard_columns(good, result))
    elif task == "caption":
        _write_parquet(shards.path(k), {"id": ids, "caption": list(result)})
    else:
        _write_parquet(shards.path(k), {"id": ids, "question": [r["question"] for r in good], "answer": list(result)})


def _save_npy(path: Path, array: np.ndarray) -> None:
    with path.open("wb") as f:  # a file object: np.save would append ".npy" to the temporary name
        np.save(f, array)


def _ids_digest(records: Sequence[dict[str, Any]]) -> str:
    """A digest of the record ids in order (a data source's name for itself: no pass over every
    record): a rerun over another set is refused, not mixed in."""
    names = [records.identity] if hasattr(records, "identity") else (str(r["id"]) for r in records)
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
