"""Images from files, PIL images or arrays, preprocessed for evaluation and generation.

The pixels are LAVIS's `blip_image_eval` (= HF `BlipImageProcessor`, spec §10): see
`data/transforms.py`. The output is NHWC, the layout our vision tower takes.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from blip2_jax.data.transforms import CLIP_MEAN, CLIP_STD, blip_image_eval, to_rgb
from blip2_jax.errors import InputNotFound

__all__ = ["CLIP_MEAN", "CLIP_STD", "ImageInput", "check_image_file", "load_image", "preprocess_images"]

ImageInput = str | os.PathLike | Image.Image | np.ndarray  # a file, a PIL image, or uint8 (H,W,3) / (H,W)


def check_image_file(path: str | os.PathLike) -> None:
    """An image path names a file (callers check every path before loading a model)."""
    if os.path.isdir(path):
        raise InputNotFound(f"image {os.fspath(path)} is a directory; give each image file (e.g. "
                            f"{os.fspath(path)}/*.jpg)")
    if not os.path.isfile(path):
        raise InputNotFound(f"image file {os.fspath(path)} not found")


def load_image(image: ImageInput) -> Image.Image:
    """An RGB PIL image from a file path, a PIL image (any mode) or a uint8 (H,W,3) or (H,W) array."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
            raise ValueError(f"an image array must be uint8 (H,W,3) or (H,W), got {image.dtype} {image.shape}")
        return Image.fromarray(image).convert("RGB")
    if not isinstance(image, (str, os.PathLike)):
        raise TypeError(f"an image is a file path, a PIL image or a uint8 array, got {type(image).__name__}")
    check_image_file(image)
    try:
        with Image.open(image) as opened:
            return to_rgb(opened)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{os.fspath(image)} is not a readable image: {e}") from e


def preprocess_images(images: Sequence[ImageInput], size: int) -> np.ndarray:
    """(B, size, size, 3) float32 pixel values, normalised as the BLIP-2 checkpoints expect. A file
    named twice is read once: a VQA batch holds each image's questions side by side (easy-VQA's test
    split ~10 an image, VQAv2 ~5)."""
    transform = blip_image_eval(size)
    by_path: dict[str, np.ndarray] = {}

    def pixels(image: ImageInput) -> np.ndarray:
        if not isinstance(image, (str, os.PathLike)):
            return transform(load_image(image))
        key = os.fspath(image)
        if key not in by_path:
            by_path[key] = transform(load_image(image))
        return by_path[key]

    return np.stack([pixels(x) for x in images])
