"""Jitted, batched generation for BLIP-2 stage-2 models (greedy, sampling, beam search)."""
