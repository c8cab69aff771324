"""Model presets as an ml_collections config.

  python -c "from ml_collections import config_flags"  # used as --config=configs/model.py:opt2.7b

`arg` is a preset name (`blip2_jax.models.presets.names()`): the published checkpoints
(opt2.7b, opt6.7b, flant5xl, flant5xxl, itm_vit_g and their -coco 364-px variants), the LAVIS
ViT-L variants (itm_vit_l, flant5xl_vit_l) and the test models (tiny, tiny_t5, tiny_itm).
Cost: none (configuration only). Any field is overridable, e.g. --config.model.dtype=bfloat16.
"""
import ml_collections

from blip2_jax.models import presets


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.preset = arg
    config.hub_id = presets.HUB_IDS.get(arg, "")
    config.model = presets.to_config_dict(presets.get(arg))
    return config
