"""Test-wide settings: float32 everywhere on CPU (parity tests compare in fp32)."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
