"""The training split's random resized crop and flip, drawn in the data workers and rendered
on the device for a whole batch at once (data.gpu_augment).

Workers draw each image's crop box and flip coin with torchvision's own RandomResizedCrop and
RandomHorizontalFlip, the same random calls in the same order as the CPU transforms, so under the
same per-image seed the parameters are exactly those the CPU path would use. The device then
resamples every crop with torchvision's antialiased bilinear filter, written as two batched
matrix products per batch (rows, then columns), the flip folded into the column weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F


def enabled(requested: bool | str, device: torch.device) -> bool:
    """data.gpu_augment: auto renders crops on a CUDA device only; true on any device (as CPU
    tests exercise it); false never."""
    return device.type == "cuda" if requested == "auto" else bool(requested)


def cap_shorter_side(pixels: torch.Tensor, cap: int) -> torch.Tensor:
    """The image with its shorter side resized down to `cap` (antialiased) if it is longer."""
    if min(pixels.shape[-2:]) > cap:
        return F.resize(pixels, cap, antialias=True)
    return pixels


@dataclass(frozen=True)
class Crop:
    """One training image and its draw: the crop box in its pixels, whether to flip it."""

    pixels: torch.Tensor  # uint8 (3, height, width)
    box: tuple[float, float, float, float]  # top, left, height, width
    flip: bool
    size: int  # the side of the square it renders to


class DrawCrop:
    """The train transform with data.gpu_augment: draws what v2.RandomResizedCrop(size) followed
    by v2.RandomHorizontalFlip() would do to the image, and leaves the resampling to render().

    The box is drawn on the image as it arrives (the full decode, or decode_once's capped copy),
    as the CPU path draws it; the image then travels with its shorter side capped at `cap`, the
    box scaled to match, so 12-megapixel photos never reach pinned memory or the device.
    """

    def __init__(self, size: int, cap: int):
        self.crop = v2.RandomResizedCrop(size, antialias=True)
        self.flip = v2.RandomHorizontalFlip()
        self.size, self.cap = size, cap

    def __call__(self, pixels: torch.Tensor) -> Crop:
        params = self.crop.make_params([pixels])
        # v2's random-apply transforms leave the input as it is when torch.rand(1) >= p.
        flip = bool(torch.rand(1) < self.flip.p)
        height, width = pixels.shape[-2:]
        pixels = cap_shorter_side(pixels, self.cap)
        sy, sx = pixels.shape[-2] / height, pixels.shape[-1] / width
        box = (params["top"] * sy, params["left"] * sx, params["height"] * sy, params["width"] * sx)
        return Crop(pixels, box, flip, self.size)


@dataclass(frozen=True)
class CropBatch:
    """A batch of Crops: the images padded to the largest height and width, their boxes and flips.

    pin_memory() and to() let it travel as a tensor would: DataLoader's pin_memory calls the one,
    runtime.Runtime.inputs the other, and then render().
    """

    images: torch.Tensor  # uint8 (B, 3, height, width), zero-padded at the bottom and right
    boxes: torch.Tensor  # float32 (B, 4): top, left, height, width
    flips: torch.Tensor  # bool (B,)
    size: int  # the rendered crops' side

    def __len__(self) -> int:
        return len(self.images)

    def pin_memory(self) -> CropBatch:
        return CropBatch(
            self.images.pin_memory(), self.boxes.pin_memory(), self.flips.pin_memory(), self.size
        )

    def to(self, device: torch.device, non_blocking: bool = False) -> CropBatch:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        return CropBatch(move(self.images), move(self.boxes), move(self.flips), self.size)

    def render(self) -> torch.Tensor:
        """float32 (B, 3, size, size) crops on the batch's device, values 0 to 255 as the uint8
        CPU path gives them: torchvision's antialiased resized_crop, then the flip."""
        _, _, height, width = self.images.shape
        top, left, box_h, box_w = self.boxes.unbind(1)
        rows = resize_weights(top, box_h, height, self.size)  # (B, size, height)
        cols = resize_weights(left, box_w, width, self.size)  # (B, size, width)
        cols = torch.where(self.flips[:, None, None], cols.flip(1), cols)
        images = self.images.float()
        # (B,1,S,H) @ (B,3,H,W) @ (B,1,W,S): each output pixel a weighted sum over its box only.
        out = rows.unsqueeze(1) @ images @ cols.transpose(1, 2).unsqueeze(1)
        return out.round_().clamp_(0, 255)


def resize_weights(start: torch.Tensor, length: torch.Tensor, extent: int, size: int) -> torch.Tensor:
    """(B, size, extent) weights resampling each image's [start, start + length) along one axis to
    `size` samples, as torch's antialiased bilinear interpolation does (align_corners=False): a
    triangle filter widened by the downscale factor, normalised over the pixels inside the box.
    """
    start, length = start[:, None, None], length[:, None, None]
    scale = length / size
    support = scale.clamp(min=1.0)  # upscaling: plain bilinear
    out = torch.arange(size, device=start.device, dtype=start.dtype)[None, :, None]
    pixel = torch.arange(extent, device=start.device, dtype=start.dtype)[None, None, :]
    centre = (out + 0.5) * scale  # in the box's coordinates
    weights = (1 - ((pixel + 0.5 - start - centre) / support).abs()).clamp(min=0)
    # The pixels the box covers; for a whole-pixel box exactly [start, start + length). The
    # slack is insurance: a box scaled to a shrunk image's edge whose end rounded a hair beyond
    # it would take in a padded (black) pixel.
    slack = 1e-3
    inside = (pixel >= (start + slack).floor()) & (pixel < (start + length - slack).ceil())
    weights = weights * inside
    return weights / weights.sum(2, keepdim=True)


def collate(crops: Sequence[Crop]) -> CropBatch:
    """Crops of any sizes as one CropBatch, the images zero-padded to the largest of each side."""
    height = max(c.pixels.shape[-2] for c in crops)
    width = max(c.pixels.shape[-1] for c in crops)
    images = torch.zeros((len(crops), 3, height, width), dtype=torch.uint8)
    for image, crop in zip(images, crops, strict=True):
        image[:, : crop.pixels.shape[-2], : crop.pixels.shape[-1]] = crop.pixels
    boxes = torch.tensor([c.box for c in crops], dtype=torch.float32)
    flips = torch.tensor([c.flip for c in crops], dtype=torch.bool)
    return CropBatch(images, boxes, flips, crops[0].size)
