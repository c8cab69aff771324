"""Flax linen modules: vision towers, Q-Former, OPT, T5 and the BLIP-2 composites."""
