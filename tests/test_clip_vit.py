"""The CLIP ViT-L/14 variant (LAVIS pretrain_vitL) against a PyTorch definition of it
(issue "model family" Done-when 3), at its own resolution and interpolated (align_corners=True)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn

from blip2_jax.models.config import VisionConfig
from blip2_jax.models.vit import VisionModel
from blip2_jax.weights.hf_names import from_hf
from tests.reference import clip_vit
from tests.reference.hf_models import nhwc, perturb, pixels

CFG = VisionConfig(variant="clip", image_size=28, patch_size=4, hidden_size=32, intermediate_size=128,
                   num_hidden_layers=2, num_attention_heads=4, hidden_act="quick_gelu", layer_norm_eps=1e-5)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    reference = perturb(clip_vit.ClipViT(28, 4, 32, 2, 4))
    ours = VisionModel(CFG)
    abstract = nn.unbox(jax.eval_shape(ours.init, jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 3)))["params"])
    params = from_hf(clip_vit.to_hf_names(reference.state_dict()), abstract)
    return reference, ours, {"params": params}


@pytest.mark.parametrize("size", [28, 40])
def test_clip_vit_matches_pytorch_definition(models, size):
    reference, ours, variables = models
    px = pixels(2, size=size, seed=size)
    with torch.no_grad():
        expected = reference(torch.tensor(px)).numpy()
    got = ours.apply(variables, jnp.asarray(nhwc(px)), interpolate_pos_encoding=True)
    assert got.shape == expected.shape == (2, (size // 4) ** 2 + 1, 32)
    assert float(np.abs(np.asarray(got) - expected).max()) <= 1e-4


def test_clip_patch_conv_has_no_bias(models):
    _, _, variables = models
    assert set(variables["params"]["embeddings"]["patch_embedding"]) == {"kernel"}
    assert "pre_layernorm" in variables["params"]
