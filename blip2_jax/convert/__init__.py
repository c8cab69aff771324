"""The conversion commands (`blip2-jax convert`), built on `weights/`: Hugging Face <-> model
checkpoints (`hf_export.py`) and LAVIS <-> model checkpoints (`lavis.py`)."""
