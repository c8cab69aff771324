"""The loading layer: any checkpoint -> architecture, config, tokenizer and parameters placed in
their shardings (`load.py`). The name tables and file formats it reads still live in `convert/`."""
