"""The loading layer: any checkpoint -> architecture, config, tokenizer and parameters placed in
their shardings (`load.py`), and what it reads with: the Hugging Face name map (`hf_names.py`),
streaming safetensors (`safetensors_io.py`), Hugging Face directories (`hf_checkpoint.py`), our
model checkpoints (`model_checkpoint.py`), LAVIS names (`lavis_names.py`), and the two
initialisations from other weights (`bert_init.py`, `stage1_to_stage2.py`)."""
