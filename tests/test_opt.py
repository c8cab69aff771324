"""OPT on its own: the architecture variants (project_in/out and post-LN as in OPT-350m) against
`transformers`, and cached incremental decoding against a full forward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import linen as nn

from blip2_jax.models.config import text_config_from_hf
from blip2_jax.models.attention import position_ids_from_mask
from blip2_jax.models.opt import OPTForCausalLM
from blip2_jax.weights.hf_names import from_hf
from tests.reference.hf_models import OPT, padded_text, perturb


def _pair(**overrides):
    torch.manual_seed(0)
    hf = perturb(transformers.OPTForCausalLM(transformers.OPTConfig(**dict(OPT, **overrides))))
    cfg = text_config_from_hf(hf.config.to_dict())
    model = OPTForCausalLM(cfg)
    abstract = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 3, cfg.embed_dim)),
                                       jnp.ones((1, 3), jnp.int32))["params"])
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    return hf, model, {"params": from_hf(sd, abstract)}


def _logits(model, variables, ids, mask):
    embeds = model.apply(variables, jnp.asarray(ids), method=model.embed)
    return model.apply(variables, embeds, jnp.asarray(mask))[0]


@pytest.mark.parametrize("overrides", [dict(word_embed_proj_dim=8), dict(do_layer_norm_before=False)],
                         ids=["project_in_out", "post_layer_norm"])
def test_opt_variants_match_transformers(overrides):
    hf, model, variables = _pair(**overrides)
    ids, mask = padded_text([7, 4, 5], 7, 99, left=True)
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    got = np.asarray(_logits(model, variables, ids, mask))
    assert np.abs(got - expected)[mask.astype(bool)].max() <= 1e-4


def test_position_ids_follow_the_mask_cumsum():
    mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 0, 1, 1]])
    np.testing.assert_array_equal(position_ids_from_mask(mask), [[-1, -1, 0, 1, 2], [0, 1, -1, 2, 3]])


def test_cached_decoding_equals_full_forward():
    """Prefill a left-padded prompt, then feed one token at a time: logits equal the full pass."""
    _, model, variables = _pair()
    ids, mask = padded_text([6, 3], 9, 99, left=True, seed=1)
    prompt_len, total = 5, ids.shape[1]
    full = np.asarray(_logits(model, variables, ids, mask))
    embeds = model.apply(variables, jnp.asarray(ids), method=model.embed)
    positions = position_ids_from_mask(jnp.asarray(mask))
    cache = model.apply(variables, 2, total, method=model.init_cache)
    buffer_mask = jnp.asarray(mask)  # mask over the whole cache buffer (all tokens known in advance)
    step = jax.jit(lambda emb, pos, cache, index: model.apply(
        variables, emb, buffer_mask, position_ids=pos, cache=cache, cache_index=index))
    logits, cache = step(embeds[:, :prompt_len], positions[:, :prompt_len], cache, 0)
    pieces = [np.asarray(logits)]
    for t in range(prompt_len, total):
        logits, cache = step(embeds[:, t:t + 1], positions[:, t:t + 1], cache, t)
        pieces.append(np.asarray(logits))
    incremental = np.concatenate(pieces, axis=1)
    valid = mask.astype(bool)
    assert np.abs(incremental - full)[valid].max() <= 1e-5
    # Skipping the LM head at the first positions leaves the rest unchanged.
    tail = np.asarray(model.apply(variables, embeds, jnp.asarray(mask), logits_from=prompt_len)[0])
    assert tail.shape[1] == total - prompt_len
    assert np.abs(tail - full[:, prompt_len:])[valid[:, prompt_len:]].max() <= 1e-5
