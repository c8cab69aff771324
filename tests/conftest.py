"""Test-wide settings: float32 matmuls at full precision on CPU, and 8 simulated CPU devices so
sharding tests run in the same process (they must be set before JAX initialises)."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
