"""Input pipelines: sources, transforms, tokenizers."""
