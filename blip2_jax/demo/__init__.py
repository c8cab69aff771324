"""`blip2-jax demo`: BLIP-2's two stages end to end on the packaged easy-VQA set, on CPU."""
