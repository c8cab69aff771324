"""CapFilt as BLIP-2 bootstraps its pre-training captions (paper §3.4): several captions per image
by nucleus sampling, ranked together with the image's own captions by ITC similarity, the top ones
kept (the paper: 10 sampled, top two kept, one drawn per step; its ranker was CLIP ViT-L/14, here
any retrieval model).

Each image samples with its own key, `fold_in(PRNGKey(seed), crc32(id))`: its captions do not
depend on the batch, the shard, the mesh or the rest of the set. Candidates are ranked by the
ITC score the retrieval evaluator computes (max over the queries of the normalised image rows
against the text's [CLS] row); ties keep the earlier candidate, the image's own captions first.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Sequence

import jax
import numpy as np

from blip2_jax.errors import UserError
from blip2_jax.data.tokenizers import qformer_tokenizer
from blip2_jax.features import MeshFeatures, check_feature
ANNOTATIONS = "annotations.json"


@dataclasses.dataclass(frozen=True)
class CapFiltConfig:
    ranker: str  # a retrieval model (stage 1): its ITC ranks the candidates
    num_captions: int = 10  # sampled per image
    keep: int = 2  # of the sampled and the image's own, ranked
    seed: int = 0

    def __post_init__(self):
        if self.num_captions < 1 or self.keep < 1:
            raise UserError(f"--num_captions and --keep must be >= 1, got {self.num_captions} and {self.keep}")


def image_keys(ids: Sequence[str], seed: int) -> np.ndarray:
    """(n, 2) uint32 sampling keys, one per image id."""
    base = jax.random.PRNGKey(seed)
    data = np.array([zlib.crc32(str(i).encode()) for i in ids], np.uint32)
    return np.asarray(jax.vmap(lambda d: jax.random.fold_in(base, d))(data))


def check_ranker(path: str, step: int | None) -> None:
    """Refuse a ranker without ITC features, from its metadata, before any model loads."""
    # pylint: disable=import-outside-toplevel
    from blip2_jax.models import blip2
    from blip2_jax.weights.load import open_source

    source = open_source(path, step)
    check_feature(blip2.build(source.config, source.architecture), "itc_image")


def candidates(own: list[str], sampled: list[str]) -> list[str]:
    """The image's own captions, then the sampled ones; empty and repeated texts once at most."""
    return list(dict.fromkeys(t for t in (*own, *sampled) if t.strip()))


class Ranker:
    """ITC scores of each image's candidates under a retrieval model, over the mesh, and the ones kept."""

    def __init__(self, config: CapFiltConfig, mesh: Any, batch_size: int):
        from blip2_jax.evaluate.model import load_model  # pylint: disable=import-outside-toplevel

        self.keep = config.keep
        model = load_model(config.ranker, mesh)
        if not model.tokenizer:
            raise UserError(f"--ranker {config.ranker}: no Q-Former tokenizer beside its weights (tokenizer files)")
        self.features = MeshFeatures(model.module, model.params, mesh, batch_size=batch_size,
                                     tokenizer=qformer_tokenizer(model.tokenizer))

    def __call__(self, images: list, texts: list[list[str]]) -> list[dict[str, Any]]:
        """Per image: candidates and their scores, and the kept captions and scores, best first."""
        image_rows = self.features.images(images, "itc_image")  # (n, Q, E)
        flat = [t for ts in texts for t in ts]
        text_rows = self.features.itc_texts(flat) if flat else np.zeros((0, image_rows.shape[-1]), np.float32)
        out, start = [], 0
        for image, ts in zip(image_rows, texts):
            scores = (image @ text_rows[start:start + len(ts)].T).max(axis=0) if ts else np.zeros((0,), np.float32)
            start += len(ts)
            best = np.argsort(-scores, kind="stable")[:self.keep]
            out.append({"candidates": ts, "candidate_scores": scores.astype(np.float32).tolist(),
                        "captions": [ts[i] for i in best], "scores": scores[best].astype(np.float32).tolist()})
        return out


def shard_columns(records: Sequence[dict[str, Any]], ranked: list[dict[str, Any]]) -> dict[str, list]:
    """A capfilt shard's Parquet columns: per image its id, file, kept captions and their scores,
    and every candidate with its score."""
    return {"id": [r["id"] for r in records], "image": [r["file"] for r in records],
            **{k: [r[k] for r in ranked] for k in ("captions", "scores", "candidates", "candidate_scores")}}


def annotations(shards: Sequence[dict[str, list]]) -> list[dict[str, Any]]:
    """The LAVIS-style caption records of every shard, in order: `image` (relative to the input's
    root, as the training pipeline's `data.image_root` takes it), `image_id` and the kept `caption`
    list, which `data.source=json` reads as one training pair per caption."""
    return [{"image": image, "image_id": i, "caption": list(kept)}
            for shard in shards for i, image, kept in zip(shard["id"], shard["image"], shard["captions"])]
