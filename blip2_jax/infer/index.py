"""A retrieval index from `blip2-jax infer embed --feature itc_image`, and text search over it.

BLIP-2's ITC score of an image and a text is the best of the image's Q query rows against the
text's [CLS] row (all normalised). The index keeps that exactly: `index.npy` (N*Q, E) float32,
image i's rows at i*Q..(i+1)*Q-1, `index.ids.json` the N ids, `index.json` what made it. A flat
inner-product index over the rows (e.g. FAISS `IndexFlatIP`) returns rows; row r is image r // Q.
Search reads the matrix memory-mapped, a chunk of images at a time.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from blip2_jax.errors import InputNotFound, UserError
from blip2_jax.infer.shards import Shards, write_atomic

MATRIX, IDS, META = "index.npy", "index.ids.json", "index.json"
CHUNK_IMAGES = 65536  # images scored at a time: bounds search memory on any index size


def write_index(shards: Shards, out: Path, meta: dict[str, Any]) -> None:
    """Assemble the index from the shards of a finished `itc_image` run, streamed shard by shard."""
    ids: list[str] = []
    shapes = []
    for k in range(len(shards)):
        ids += json.loads(shards.path(k, ".ids.json").read_text())
        shapes.append(np.load(shards.path(k), mmap_mode="r").shape)
    queries, dim = next((s[1:] for s in shapes if len(s) == 3), (0, 0))

    def write_matrix(tmp: Path) -> None:
        matrix = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(ids) * queries, dim))
        row = 0
        for k, shape in enumerate(shapes):
            if len(shape) == 3:  # a shard whose images all failed holds an empty array
                block = np.load(shards.path(k)).reshape(-1, dim)
                matrix[row:row + len(block)] = block
                row += len(block)
        matrix.flush()
        del matrix

    write_atomic(out / MATRIX, write_matrix)
    write_atomic(out / IDS, lambda tmp: tmp.write_text(json.dumps(ids)))
    write_atomic(out / META, lambda tmp: tmp.write_text(json.dumps({**meta, "images": len(ids), "queries": queries,
                                                                     "dim": dim}, indent=1)))


@dataclasses.dataclass(frozen=True)
class EmbeddingIndex:
    matrix: np.ndarray  # (N*Q, E), memory-mapped
    ids: list[str]
    meta: dict[str, Any]

    @classmethod
    def open(cls, directory: str | Path) -> EmbeddingIndex:
        root = Path(directory)
        if not (root / META).is_file():
            raise InputNotFound(f"--index {root}: no {META}; build it with `blip2-jax infer embed --feature itc_image`")
        meta = json.loads((root / META).read_text())
        matrix = np.load(root / MATRIX, mmap_mode="r")
        ids = json.loads((root / IDS).read_text())
        if matrix.shape != (len(ids) * meta["queries"], meta["dim"]):
            raise UserError(f"--index {root}: {MATRIX} is {matrix.shape}, expected ({len(ids)} ids x "
                            f"{meta['queries']} queries, {meta['dim']})")
        return cls(matrix, ids, meta)

    def scores(self, text_rows: np.ndarray) -> np.ndarray:
        """ITC scores (N, T) of every image against each text's [CLS] row (T, E)."""
        if text_rows.shape[-1] != self.meta["dim"]:
            raise UserError(f"the text features are {text_rows.shape[-1]}-wide; the index holds {self.meta['dim']}: "
                            "search with the model that built it")
        q, out = self.meta["queries"], []
        for start in range(0, len(self.ids), CHUNK_IMAGES):
            block = np.asarray(self.matrix[start * q:(start + CHUNK_IMAGES) * q], np.float32)
            out.append((block @ text_rows.T).reshape(-1, q, len(text_rows)).max(axis=1))
        return np.concatenate(out) if out else np.zeros((0, len(text_rows)), np.float32)

    def search(self, text_rows: np.ndarray, top_k: int) -> list[list[tuple[str, float]]]:
        """Per text, its `top_k` images by ITC score, best first (ties: the earlier image)."""
        scores = self.scores(text_rows)
        out = []
        for t in range(scores.shape[1]):
            best = np.argsort(-scores[:, t], kind="stable")[:top_k]
            out.append([(self.ids[i], float(scores[i, t])) for i in best])
        return out


def search_texts(index_dir: str | Path, queries: Sequence[str], *, checkpoint: str = "", tokenizer: str = "",
                 top_k: int = 10) -> list[dict[str, Any]]:
    """Rank the index's images for each text query with the retrieval model that built it (or
    `checkpoint`): [{"query", "results": [{"id", "score"}, ...]}, ...]."""
    from blip2_jax.features import FeatureExtractor  # pylint: disable=import-outside-toplevel

    if top_k < 1:
        raise UserError(f"--top_k must be >= 1, got {top_k}")
    index = EmbeddingIndex.open(index_dir)
    extractor = FeatureExtractor.from_pretrained(checkpoint or index.meta["checkpoint"],
                                                 step=None if checkpoint else index.meta.get("step"),
                                                 tokenizer=tokenizer)
    if extractor.tokenizer is None:
        raise UserError("the retrieval model names no Q-Former tokenizer: give --tokenizer")
    ranked = index.search(extractor.texts(list(queries))[:, 0], top_k)
    return [{"query": q, "results": [{"id": i, "score": s} for i, s in r]} for q, r in zip(queries, ranked)]
