"""BLIP image processors (LAVIS `blip_processors.py`, spec §10) on PIL images, seeded per record.

LAVIS composes torchvision transforms that draw from the global torch/numpy RNGs; here every
random choice comes from a `numpy.random.Generator` passed in, so a Grain pipeline that seeds one
per record gets the same pixels for that record on any host, worker or resume. Draw order per image:
crop (torchvision's `RandomResizedCrop.get_params`), flip, then the RandomAugment ops.
Outputs are float32 (size, size, 3), normalised with the OpenAI CLIP mean and std.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CROP_RATIO = (3 / 4, 4 / 3)  # torchvision's RandomResizedCrop default, which LAVIS keeps
# 16-bit grey (PNG/TIFF); "I" is how Pillow has long opened such files. PIL's own convert clips them at 255.
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})

Crop = tuple[int, int, int, int]  # (top i, left j, height h, width w), torchvision's order


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as LAVIS gets it from `Image.open(f).convert("RGB")` (alpha dropped, not composited),
    except that 16-bit grey is scaled to 8 bit (v / 257, rounded) instead of clipped."""
    if image.mode in SIXTEEN_BIT_MODES:
        pixels = np.clip(np.asarray(image, np.float64), 0, 65535)
        image = Image.fromarray(np.round(pixels / 257).astype(np.uint8))
    return image.convert("RGB")


def normalize(image: Image.Image) -> np.ndarray:
    """torchvision ToTensor + Normalize(CLIP) in HWC: (H, W, 3) float32."""
    pixels = np.asarray(image, np.float32) / 255.0
    return (pixels - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


def sample_crop(width: int, height: int, rng: np.random.Generator,
                scale: tuple[float, float] = (0.5, 1.0), ratio: tuple[float, float] = CROP_RATIO) -> Crop:
    """torchvision's `RandomResizedCrop.get_params`: up to 10 tries of a box with area fraction in
    `scale` and log-uniform aspect ratio (w/h) in `ratio` that fits; else the central crop of the
    whole image clamped to `ratio`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    w, h = width, height
    if width / height < min(ratio):
        h = round(w / min(ratio))
    elif width / height > max(ratio):
        w = round(h * max(ratio))
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(image: Image.Image, crop: Crop, size: int, flip: bool) -> Image.Image:
    """The deterministic half of RandomResizedCrop + RandomHorizontalFlip (torchvision on PIL)."""
    i, j, h, w = crop
    out = image.crop((j, i, j + w, i + h)).resize((size, size), Image.BICUBIC)
    return ImageOps.mirror(out) if flip else out


# --- RandomAugment (LAVIS `randaugment.py`, N=2, M=5) -------------------------------------------
# LAVIS implements the ops with OpenCV on uint8 arrays; these are the same maps with PIL. Geometry
# uses cv2's convention (forward matrix on pixel indices, bilinear, grey fill), so the outputs agree
# up to cv2's fixed-point interpolation weights; the colour ops are the PIL ops LAVIS re-implements.
MAX_LEVEL = 10
FILL = (128, 128, 128)
TRANSLATE_PIXELS = 10  # LAVIS `translate_const`: absolute pixels at MAX_LEVEL, whatever the image size


def _warp(image: Image.Image, forward: np.ndarray) -> Image.Image:
    """cv2.warpAffine(image, forward) with PIL: PIL wants the inverse map, on pixel-centre coordinates."""
    inv = np.linalg.inv(forward[:, :2])
    shift = inv @ -forward[:, 2] + 0.5 - inv @ np.array([0.5, 0.5])
    data = (inv[0, 0], inv[0, 1], shift[0], inv[1, 0], inv[1, 1], shift[1])
    return image.transform(image.size, Image.AFFINE, data, Image.BILINEAR, fillcolor=FILL)


def _signed(value: float, rng: np.random.Generator) -> float:
    return -value if rng.random() < 0.5 else value


def _enhance_factor(level: float) -> float:
    return level / MAX_LEVEL * 1.8 + 0.1  # 1.0 at M=5: Brightness and Sharpness are then identities


def _shear(image: Image.Image, level: float, rng: np.random.Generator, axis: int) -> Image.Image:
    forward = np.eye(2, 3)
    forward[axis, 1 - axis] = _signed(level / MAX_LEVEL * 0.3, rng)
    return _warp(image, forward)


def _translate(image: Image.Image, level: float, rng: np.random.Generator, axis: int) -> Image.Image:
    forward = np.eye(2, 3)
    forward[axis, 2] = -_signed(level / MAX_LEVEL * TRANSLATE_PIXELS, rng)
    return _warp(image, forward)


def _rotate(image: Image.Image, level: float, rng: np.random.Generator) -> Image.Image:
    """Counter-clockwise about (W/2, H/2), as cv2.getRotationMatrix2D."""
    angle = math.radians(_signed(level / MAX_LEVEL * 30, rng))
    a, b = math.cos(angle), math.sin(angle)
    cx, cy = image.width / 2, image.height / 2
    return _warp(image, np.array([[a, b, (1 - a) * cx - b * cy], [-b, a, b * cx + (1 - a) * cy]]))


AugmentOp = Callable[[Image.Image, float, np.random.Generator], Image.Image]
AUGMENT_OPS: dict[str, AugmentOp] = {  # LAVIS blip_image_train's list, in its order
    "Identity": lambda im, level, rng: im,
    "AutoContrast": lambda im, level, rng: ImageOps.autocontrast(im),
    "Brightness": lambda im, level, rng: ImageEnhance.Brightness(im).enhance(_enhance_factor(level)),
    "Sharpness": lambda im, level, rng: ImageEnhance.Sharpness(im).enhance(_enhance_factor(level)),
    "Equalize": lambda im, level, rng: ImageOps.equalize(im),
    "ShearX": lambda im, level, rng: _shear(im, level, rng, axis=0),
    "ShearY": lambda im, level, rng: _shear(im, level, rng, axis=1),
    "TranslateX": lambda im, level, rng: _translate(im, level, rng, axis=0),
    "TranslateY": lambda im, level, rng: _translate(im, level, rng, axis=1),
    "Rotate": _rotate,
}


def rand_augment(image: Image.Image, rng: np.random.Generator, num_ops: int = 2, magnitude: float = 5) -> Image.Image:
    """LAVIS RandomAugment: `num_ops` ops drawn with replacement, each applied with probability 0.5."""
    names = list(AUGMENT_OPS)
    for op in rng.choice(len(names), num_ops):
        if rng.random() <= 0.5:  # LAVIS skips when random() > prob
            image = AUGMENT_OPS[names[op]](image, magnitude, rng)
    return image


@dataclasses.dataclass(frozen=True)
class ImageTransform:
    """A BLIP image processor: PIL image (any mode) and a Generator -> (size, size, 3) float32.

    A frozen dataclass rather than a closure so that Grain can pickle it into worker processes.
    `crop_scale` None is the eval processor (whole-image resize, no randomness).
    """

    size: int
    crop_scale: tuple[float, float] | None = None
    augment: bool = False

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> np.ndarray:
        image = to_rgb(image)
        if self.crop_scale is None:
            return normalize(image.resize((self.size, self.size), Image.BICUBIC))
        if rng is None:
            raise ValueError("a training image transform needs a numpy Generator (one per record)")
        crop = sample_crop(image.width, image.height, rng, self.crop_scale)
        image = resized_crop(image, crop, self.size, flip=bool(rng.random() < 0.5))
        return normalize(rand_augment(image, rng) if self.augment else image)


def blip_image_eval(size: int) -> ImageTransform:
    """Resize to (size, size) bicubic, normalise (LAVIS `blip_image_eval`, HF BlipImageProcessor)."""
    return ImageTransform(size)


def blip2_image_train(size: int, scale: tuple[float, float] = (0.5, 1.0)) -> ImageTransform:
    """RandomResizedCrop(scale) bicubic + horizontal flip (LAVIS `blip2_image_train`, BLIP-2's configs)."""
    return ImageTransform(size, scale)


def blip_image_train(size: int, scale: tuple[float, float] = (0.5, 1.0)) -> ImageTransform:
    """`blip2_image_train` followed by RandomAugment(2, 5) (LAVIS `blip_image_train`)."""
    return ImageTransform(size, scale, augment=True)

