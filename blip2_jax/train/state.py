"""The train state: what changes every step and is checkpointed (frozen towers are not in it)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainState:
    """step, trainable parameters, optimizer state (trainable leaves only), base RNG key."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array

    @classmethod
    def create(cls, params: Any, tx: optax.GradientTransformation, rng: jax.Array) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng)
