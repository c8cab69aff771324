"""The runs `blip2-jax demo` chains, one at a time (tokenizers and earlier runs under the demo's
work directory, default /tmp/blip2_jax_demo; run `blip2-jax demo` once to make them):

  blip2-jax train --config configs/demo.py:lm --workdir /tmp/blip2_jax_demo/lm
  blip2-jax train --config configs/demo.py:stage1 --workdir /tmp/blip2_jax_demo/stage1
  blip2-jax train --config configs/demo.py:stage2 --workdir /tmp/blip2_jax_demo/stage2
  blip2-jax train --config configs/demo.py:instruct --workdir /tmp/blip2_jax_demo/instruct   # demo --instruct

Presets: lm, stage1, stage2, instruct (blip2_jax/demo/configs.py says what each trains).
"""
import ml_collections

from blip2_jax.demo.configs import DEFAULT_WORKDIR, train_config
from blip2_jax.errors import UnknownName

_MODEL = {"lm": "demo", "stage1": "demo_itm", "stage2": "demo", "instruct": "demo_instruct"}  # config preset -> model preset


def get_config(arg: str = "stage1") -> ml_collections.ConfigDict:
    if arg not in _MODEL:
        raise UnknownName(f"configs/demo.py presets: {sorted(_MODEL)}; got {arg!r}")
    return train_config(arg, DEFAULT_WORKDIR)
