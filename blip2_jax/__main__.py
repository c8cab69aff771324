"""`python -m blip2_jax ...` is the `blip2-jax` command."""
from blip2_jax.cli import run

run()
