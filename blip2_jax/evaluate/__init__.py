"""Evaluation sharded over every device and host: captioning, VQA and retrieval, their data sets,
and the official metrics (`blip2-jax eval`)."""
