"""blip2_jax: BLIP-2 in JAX/Flax, numerically faithful to Hugging Face `transformers` and LAVIS."""
from blip2_jax.models import presets
from blip2_jax.models.blip2 import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, build
from blip2_jax.models.config import Blip2Config, OPTConfig, QFormerConfig, T5Config, VisionConfig
from blip2_jax.weights.hf_checkpoint import load_pretrained

__all__ = [
    "Blip2Config", "Blip2ForConditionalGeneration", "Blip2ForImageTextRetrieval", "OPTConfig", "QFormerConfig",
    "T5Config", "VisionConfig", "build", "load_pretrained", "presets",
]
