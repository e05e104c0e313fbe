"""One image file to one model input: Pillow guarded against decompression bombs, decode, resize, normalise.

What training and inference share: the val transform, the Normalizer and decode are how a logged
model reads its images too (classifier.py).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import BinaryIO

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import v2

from visiontune import VisiontuneError, augment, portable

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Decoded training images keep their shorter side up to this many times the input size: the
# random crops are then drawn from nearly the original pixels, and 12-megapixel photos do not
# fill the memory budget. Smaller images are kept exactly as decoded.
DECODED_SIDE_FACTOR = 2


class TooManyPixels(VisiontuneError):
    """An image whose header claims more pixels than allowed: possibly a decompression bomb."""


# Pillow's guard against decompression bombs reads a process-wide global. Each decode turns it
# off and applies the limit it was handed instead, so the limit travels with the dataset into
# DataLoader workers whatever their start method, and the caller's global is left as it was.
# The lock keeps two threads from restoring each other's value.
_PILLOW_GLOBAL = threading.Lock()


@contextlib.contextmanager
def _pixel_limit(max_image_pixels: int | None) -> Iterator[int | None]:
    """The limit to check, while Pillow's own check is off; None: Pillow's own limit."""
    with _PILLOW_GLOBAL:
        pillow_max = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        # Pillow warns above its global and refuses above twice that: null keeps its refusal.
        pillow_limit = None if pillow_max is None else 2 * pillow_max
        try:
            yield pillow_limit if max_image_pixels is None else max_image_pixels
        finally:
            Image.MAX_IMAGE_PIXELS = pillow_max


def _check_pixels(path: str, image: Image.Image, limit: int | None) -> None:
    pixels = image.width * image.height
    if limit is not None and pixels > limit:
        raise TooManyPixels(
            f"image {path} claims {pixels:,} pixels, over the limit of {limit:,} that guards against "
            f"decompression bombs. If you trust the file, raise the limit (data.max_image_pixels={pixels}), "
            f"or pass data.skip_bad_images=true to leave such files out."
        )


# PIL decodes (libjpeg-turbo in Pillow's wheels); the rest runs on uint8 tensors, whose
# antialiased resize in torch is vectorised.
_to_uint8 = v2.PILToTensor()


def decode(source: str | BinaryIO, max_image_pixels: int | None = None, name: str = "") -> torch.Tensor:
    """The image at a path (or in an open binary file) as an upright uint8 RGB tensor (3, height, width).

    `name` is what messages call an image that is not a path (a row of a request, say)."""
    with _pixel_limit(max_image_pixels) as limit, Image.open(source) as image:
        _check_pixels(name or str(source), image, limit)
        # Phones store photos sideways and record the turn in EXIF.
        ImageOps.exif_transpose(image, in_place=True)
        return _to_uint8(_to_rgb(image))


# 16-bit greys scaled down to 8 bits: the logged model's loader does it, and training must alike.
_to_rgb = portable.to_rgb


def header_problem(path: str, max_image_pixels: int | None) -> Exception | None:
    """Why the image at path cannot be used, as far as its header tells; None if it can."""
    try:
        with _pixel_limit(max_image_pixels) as limit, Image.open(path) as image:
            _check_pixels(path, image, limit)
    except (TooManyPixels, UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        return err
    return None


def transforms(input_size: int, gpu_augment: bool = False, policy=None) -> dict[str, Callable]:
    """The tutorial's geometry on uint8 tensors: random crop and flip to train (then the `augment`
    group's policy and random erasing, `policy` an AugmentSettings), centre crop to validate.

    Images stay uint8 until they reach the device, where Normalizer scales a whole batch at once:
    a quarter of the bytes through worker queues and pinned memory, one tensor op per batch.
    With gpu_augment the training augmentation is only drawn here (the same parameters) and the
    device renders it (augment.py).
    """
    cap = DECODED_SIDE_FACTOR * input_size
    return {
        "train": augment.train_transform(policy, input_size, gpu_augment, cap),
        "val": v2.Compose([v2.Resize(input_size, antialias=True), v2.CenterCrop(input_size)]),
    }


class Normalizer:
    """uint8 batches -> float batches with ImageNet normalisation, on the batch's device."""

    def __init__(self, device: torch.device, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
        # x / 255 - mean) / std  ==  x * scale + shift, one fused multiply-add.
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -torch.tensor(mean, device=device).view(1, 3, 1, 1) / std_t

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, images.float(), self.scale)
