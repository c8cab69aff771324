"""Weight conversion between blip2_jax and Hugging Face (and, later, LAVIS) formats."""
