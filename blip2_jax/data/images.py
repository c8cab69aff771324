"""Evaluation-time image preprocessing (LAVIS `blip_image_eval`, HF `BlipImageProcessor`; spec §10).

Resize to (size, size) with PIL's bicubic filter (the aspect ratio is not kept), scale to [0, 1] and
normalise with the OpenAI CLIP mean and std. The output is NHWC, the layout our vision tower takes.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageInput = str | os.PathLike | Image.Image | np.ndarray  # a file, a PIL image, or uint8 (H,W,3) / (H,W)


def load_image(image: ImageInput) -> Image.Image:
    """An RGB PIL image from a file path, a PIL image (any mode) or a uint8 (H,W,3) or (H,W) array."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
            raise ValueError(f"an image array must be uint8 (H,W,3) or (H,W), got {image.dtype} {image.shape}")
        return Image.fromarray(image).convert("RGB")
    if not isinstance(image, (str, os.PathLike)):
        raise TypeError(f"an image is a file path, a PIL image or a uint8 array, got {type(image).__name__}")
    if not os.path.isfile(image):
        raise FileNotFoundError(f"image file {os.fspath(image)} not found")
    try:
        with Image.open(image) as opened:
            return opened.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{os.fspath(image)} is not a readable image: {e}") from e


def preprocess_images(images: Sequence[ImageInput], size: int) -> np.ndarray:
    """(B, size, size, 3) float32 pixel values, normalised as the BLIP-2 checkpoints expect."""
    mean, std = np.asarray(CLIP_MEAN, np.float32), np.asarray(CLIP_STD, np.float32)
    pixels = [np.asarray(load_image(x).resize((size, size), Image.BICUBIC), np.float32) / 255.0 for x in images]
    return (np.stack(pixels) - mean) / std
