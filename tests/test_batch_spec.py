"""Each objective's batch spec (`data/spec.py`) is exactly what its loss reads, and what builds or
compiles a batch comes from it: the synthetic loader's rows and the trainer's abstract batch here,
the record processor's in test_data_processing / test_lm_objective (built with the spec)."""
import jax
import numpy as np
import pytest

from blip2_jax.data.loader import make_loader
from blip2_jax.data.spec import conform
from blip2_jax.models import blip2
from blip2_jax.objectives import stage1
from blip2_jax.parallel import mesh as mesh_lib
from blip2_jax.train.layout import build_layout, data_args
from tests.test_train import load_config

# (config file, preset, overrides): every objective, and each optional input
CASES = [("configs/stage1.py", "tiny", {}), ("configs/stage1.py", "tiny", {"positives": "image_id"}),
         ("configs/stage2_opt.py", "tiny", {}), ("configs/stage2_t5.py", "tiny", {}),
         ("configs/demo.py", "lm", {"context_length": 6}), ("configs/demo.py", "lm", {"context_length": 0}),
         ("configs/instruct.py", "tiny", {})]
SPECS = {"stage1": {"image", "text_ids", "text_mask"}, "stage2_opt": {"image", "text_ids", "text_mask", "labels"},
         "stage2_t5": {"image", "input_ids", "input_mask", "output_ids", "output_mask"},
         "lm_opt": {"text_ids", "text_mask", "labels"}, "stage2_llama": {"image", "text_ids", "text_mask", "labels"}}


class Reads(dict):
    """A batch that records the keys its reader takes."""

    def __init__(self, batch, seen: set):
        super().__init__(batch)
        self.seen = seen

    def __getitem__(self, key):
        self.seen.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        if key in self:  # an optional input asked for and absent is no read
            self.seen.add(key)
        return super().get(key, default)


def _layout(file, preset, overrides):
    config = load_config(file, preset)
    config.data.update(source="synthetic", mixture=(), **overrides)
    config.batch_size = 4
    config.mesh.update(num_devices=1, data=1, fsdp=1, tensor=1)
    return config, build_layout(config, mesh_lib.make_mesh(1, 1, 1, jax.devices()[:1]))


@pytest.mark.parametrize("file,preset,overrides", CASES, ids=lambda x: str(x))
def test_the_spec_is_what_the_objective_reads_and_what_the_loader_builds(file, preset, overrides):
    config, layout = _layout(file, preset, overrides)
    batch = layout.batch_abstract()
    optional = {"image_id"} if overrides.get("positives") else \
        {"context_ids", "context_mask"} if overrides.get("context_length") else \
        {"qformer_ids", "qformer_mask"} if layout.model_cfg.instruction_aware else set()
    kind = data_args(config, layout.model_cfg)["kind"]
    assert set(batch) == SPECS[kind] | optional
    seen: set = set()
    params = blip2.abstract_params(layout.model_cfg, model=layout.model)
    jax.eval_shape(lambda p, b: layout.loss_fn(p, Reads(b, seen), jax.random.PRNGKey(0)), params, batch)
    assert seen == set(batch)  # every key is read (one it lacks would raise a KeyError)
    rows = make_loader(config, **data_args(config, layout.model_cfg)).next()
    assert {k: (v.shape, v.dtype) for k, v in rows.items()} == {k: (v.shape, v.dtype) for k, v in batch.items()}
    if "image_id" in rows:  # a few equal ids in a batch of 4: positives beyond the pair itself
        assert rows["image_id"].max() < 2
    if "context_mask" in rows:  # left-padded, at least one token
        assert all(np.all(np.diff(m) >= 0) and m[-1] == 1 for m in rows["context_mask"])


def test_a_row_that_disagrees_with_the_spec_is_named():
    spec = stage1.batch_spec(4, 6, positives=True)
    good = {"image": np.zeros((4, 4, 3), np.float32), "text_ids": np.ones(6, np.int32),
            "text_mask": np.ones(6, np.int32), "image_id": np.int32(3), "extra": np.zeros(1)}
    assert list(conform(good, spec, "record 'a'")) == ["image", "text_ids", "text_mask", "image_id"]
    with pytest.raises(ValueError, match=r"record 'b' has no image_id; the objective reads image float32\[4, 4, 3\]"):
        conform({k: v for k, v in good.items() if k != "image_id"}, spec, "record 'b'")
    with pytest.raises(ValueError, match=r"record 'c': text_ids is int64\[7\], the objective reads int32\[6\]"):
        conform({**good, "text_ids": np.ones(7, np.int64)}, spec, "record 'c'")
