"""A stage-1 model for tests: the tiny HF retrieval model's tensors + a perturbed LM head."""
import jax
import numpy as np
from flax import linen as nn
from flax import traverse_util

from blip2_jax.models import blip2
from blip2_jax.objectives.stage1 import Stage1Config
from blip2_jax.weights.hf_checkpoint import params_from_state_dict
from tests.reference import hf_models as ref

VOCAB = ref.QFORMER["vocab_size"]
CONFIG = Stage1Config(bos_token_id=VOCAB - 1, pad_token_id=0)
TEMP = 0.09


def stage1_params(hf, cfg, model, seed=0):
    """Stage-1 params: the HF retrieval model's tensors + a perturbed LM head; temp = TEMP."""
    fresh = nn.unbox(jax.jit(lambda r: blip2.init(cfg, r, model))(jax.random.PRNGKey(seed))["params"])
    rng = np.random.default_rng(seed)
    flat = {k: np.asarray(v) + (0.1 * rng.standard_normal(np.shape(v)).astype(np.float32) if k[0] == "cls" else 0)
            for k, v in traverse_util.flatten_dict(fresh).items()}
    flat.update(traverse_util.flatten_dict(params_from_state_dict(ref.state_dict(hf), cfg)))
    flat[("temp",)] = np.float32(TEMP)
    return traverse_util.unflatten_dict(flat)
