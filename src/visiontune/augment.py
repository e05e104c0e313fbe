"""The training split's augmentation: crop, flip, a policy (augment=trivialaugment, ...), random
erasing, each image's parameters drawn in the data workers; with data.gpu_augment all of it is
rendered on the device, a batch at a time; mixup and cutmix mix whole batches (batch_mixer).

Workers draw each image's crop box and flip coin with torchvision's own RandomResizedCrop and
RandomHorizontalFlip, the same random calls in the same order as the CPU transforms, so under the
same per-image seed the parameters are exactly those the CPU path would use. The device then
resamples every crop with torchvision's antialiased bilinear filter, written as two batched
matrix products per batch (rows, then columns), the flip folded into the column weights.

The policies (torchvision v2's TrivialAugmentWide, RandAugment, AutoAugment) and RandomErasing are
drawn the same way: the worker runs torchvision's own class on a stand-in of the crop's size, with
its kernels swapped for a record of what they were asked to do, so the same random calls come in
the same order; the device then applies the recorded ops with torchvision's kernels, image by image.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

if TYPE_CHECKING:
    from visiontune.config import AugmentSettings

# Erased pixels take ImageNet's mean in 8 bits: 0 once normalised, the value torchvision's
# references erase to (they erase after Normalize).
ERASE_VALUE = (124, 116, 104)
INTERPOLATION = v2.InterpolationMode.BILINEAR  # as torchvision's references run the policies
Op = tuple[str, float]  # a policy's op as torchvision names it, and its signed magnitude
Box = tuple[int, int, int, int]  # top, left, height, width in the rendered crop


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
    ops: tuple[Op, ...] = ()  # the policy's ops, applied to the rendered crop in this order
    erase: Box | None = None  # the rectangle random erasing fills, if any


class DrawCrop:
    """The train transform with data.gpu_augment: draws what v2.RandomResizedCrop(size) followed
    by v2.RandomHorizontalFlip() would do to the image, and leaves the resampling to render().

    The box is drawn on the image as it arrives (the full decode, or decode_once's capped copy),
    as the CPU path draws it; the image then travels with its shorter side capped at `cap`, the
    box scaled to match, so 12-megapixel photos never reach pinned memory or the device.
    """

    def __init__(self, size: int, cap: int, settings: AugmentSettings | None = None):
        self.crop = v2.RandomResizedCrop(size, antialias=True)
        self.flip = v2.RandomHorizontalFlip()
        self.size, self.cap = size, cap
        self.policy = policy(settings, drawn=True)
        erasing = settings.random_erasing if settings else 0.0
        self.erasing = DrawnErasing(erasing, value=ERASE_VALUE) if erasing else None

    def __call__(self, pixels: torch.Tensor) -> Crop:
        params = self.crop.make_params([pixels])
        # v2's random-apply transforms leave the input as it is when torch.rand(1) >= p.
        flip = bool(torch.rand(1) < self.flip.p)
        # The policy and erasing see what the CPU path hands them: a crop of size x size (a
        # stand-in without memory: they read its shape alone).
        crop = torch.zeros(1, dtype=torch.uint8).expand(3, self.size, self.size)
        ops = self.policy.draw(crop) if self.policy else ()
        erase = self.erasing.draw(crop) if self.erasing else None
        height, width = pixels.shape[-2:]
        pixels = cap_shorter_side(pixels, self.cap)
        sy, sx = pixels.shape[-2] / height, pixels.shape[-1] / width
        box = (params["top"] * sy, params["left"] * sx, params["height"] * sy, params["width"] * sx)
        return Crop(pixels, box, flip, self.size, ops, erase)


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
    ops: tuple[tuple[Op, ...], ...] = ()  # each image's policy ops; () without a policy
    erases: tuple[Box | None, ...] = ()  # each image's erased rectangle; () without erasing

    def __len__(self) -> int:
        return len(self.images)

    def pin_memory(self) -> CropBatch:
        pinned = (t.pin_memory() for t in (self.images, self.boxes, self.flips))
        return CropBatch(*pinned, self.size, self.ops, self.erases)

    def to(self, device: torch.device, non_blocking: bool = False) -> CropBatch:
        moved = (t.to(device, non_blocking=non_blocking) for t in (self.images, self.boxes, self.flips))
        return CropBatch(*moved, self.size, self.ops, self.erases)

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
        out = out.round_().clamp_(0, 255)
        if any(self.ops) or any(e is not None for e in self.erases):
            # The policies' kernels take uint8, as on the CPU path: the values are whole already.
            pixels = out.to(torch.uint8)
            ops, erases = self.ops or ((),) * len(out), self.erases or (None,) * len(out)
            for i, (image_ops, erase) in enumerate(zip(ops, erases, strict=True)):
                pixels[i] = apply_drawn(pixels[i], image_ops, erase)
            out = pixels.float()
        return out


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
    ops = tuple(c.ops for c in crops) if any(c.ops for c in crops) else ()
    erases = tuple(c.erase for c in crops) if any(c.erase for c in crops) else ()
    return CropBatch(images, boxes, flips, crops[0].size, ops, erases)


# --- the policies and random erasing: drawn in the workers, applied wherever the crop is ---------


class _Drawn:
    """A torchvision v2 auto-augment policy that, called through draw(), records the ops its
    forward picks instead of applying them: the same random calls, in the same order."""

    def draw(self, crop: torch.Tensor) -> tuple[Op, ...]:
        self._ops: list[Op] = []
        self(crop)
        return tuple(self._ops)

    def _apply_image_or_video_transform(self, image, transform_id, magnitude, interpolation, fill):
        self._ops.append((transform_id, float(magnitude)))
        return image


class DrawnTrivialAugment(_Drawn, v2.TrivialAugmentWide):
    pass


class DrawnRandAugment(_Drawn, v2.RandAugment):
    pass


class DrawnAutoAugment(_Drawn, v2.AutoAugment):
    pass


class DrawnErasing(v2.RandomErasing):
    """v2.RandomErasing whose draw() returns the rectangle it would fill (None: it leaves the
    image as it is) instead of filling it."""

    def draw(self, crop: torch.Tensor) -> Box | None:
        self._box: Box | None = None
        self(crop)
        return self._box

    def transform(self, inpt, params):
        if params["v"] is not None:  # None: ten tries found no rectangle that fits
            self._box = (int(params["i"]), int(params["j"]), int(params["h"]), int(params["w"]))
        return inpt


# augment.name -> (the CPU path's torchvision class, its drawing twin, its arguments from the settings)
POLICIES: dict[str, tuple[type, type, Callable[[AugmentSettings], dict]]] = {
    "trivialaugment": (v2.TrivialAugmentWide, DrawnTrivialAugment, lambda s: {}),
    "randaugment": (
        v2.RandAugment,
        DrawnRandAugment,
        lambda s: {"num_ops": s.num_ops, "magnitude": s.magnitude},
    ),
    "autoaugment": (
        v2.AutoAugment,
        DrawnAutoAugment,
        lambda s: {"policy": v2.AutoAugmentPolicy.IMAGENET},
    ),
}


def policy(settings: AugmentSettings | None, drawn: bool = False):
    """The policy augment.name picks (its drawing twin with `drawn`); None for the tutorial's."""
    if settings is None or settings.name not in POLICIES:
        return None
    plain, twin, arguments = POLICIES[settings.name]
    return (twin if drawn else plain)(interpolation=INTERPOLATION, **arguments(settings))


def train_transform(settings: AugmentSettings | None, size: int, gpu_augment: bool, cap: int) -> Callable:
    """The training split's per-image transform: the CPU path renders crop, flip, policy and
    erasing in the workers; with gpu_augment the workers only draw them (DrawCrop)."""
    if gpu_augment:
        return DrawCrop(size, cap, settings)
    steps = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    chosen = policy(settings)
    steps += [chosen] if chosen else []
    if settings and settings.random_erasing:
        steps.append(v2.RandomErasing(settings.random_erasing, value=ERASE_VALUE))
    return v2.Compose(steps)


# Renders recorded ops with torchvision's own kernel dispatch (every op of the three policies).
_KERNELS = v2.TrivialAugmentWide(interpolation=INTERPOLATION)


def apply_drawn(image: torch.Tensor, ops: Sequence[Op], erase: Box | None) -> torch.Tensor:
    """A uint8 crop (3, S, S) with the drawn policy ops applied in order, then the erased box
    filled: what the CPU path's policy and RandomErasing do with the same draws."""
    for name, magnitude in ops:
        image = _KERNELS._apply_image_or_video_transform(
            image, name, magnitude, interpolation=INTERPOLATION, fill=_KERNELS._fill
        )
    if erase is not None:
        top, left, height, width = erase
        image = image.clone()
        fill = torch.tensor(ERASE_VALUE, dtype=image.dtype, device=image.device)[:, None, None]
        image[:, top : top + height, left : left + width] = fill
    return image


def describe(settings: AugmentSettings, gpu_augment: bool, device: torch.device) -> str:
    """Where each part of the augmentation runs, for the run's log."""
    parts = ["crop", "flip"]
    parts += [settings.name] if settings.name in POLICIES else []
    parts += [f"random erasing p={settings.random_erasing:g}"] if settings.random_erasing else []
    if gpu_augment:
        where = f"{', '.join(parts)}: drawn in the data workers, rendered on {device}"
    else:
        where = f"{', '.join(parts)}: drawn and rendered in the data workers"
    mixes = [f"mixup alpha={settings.mixup_alpha:g}"] if settings.mixup_alpha else []
    mixes += [f"cutmix alpha={settings.cutmix_alpha:g}"] if settings.cutmix_alpha else []
    if mixes:
        where += f"; {' / '.join(mixes)} on {device}, whole batches (p={settings.mix_prob:g})"
    return where


# --- mixup and cutmix: whole batches on the device, drawn from the loop's generator --------------


@dataclass(frozen=True)
class BatchMix:
    """torchvision v2's MixUp and CutMix (pairs: each image with the batch's previous one, as
    `roll(1, 0)` pairs them), their lambda and box drawn from the generator handed in, so that a
    resumed run mixes alike. Where both are on, each mixed batch takes one at even odds
    (v2.RandomChoice's default); mix_prob of the batches are mixed at all."""

    num_classes: int
    mixup_alpha: float
    cutmix_alpha: float
    mix_prob: float = 1.0

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixed images and soft targets (N, num_classes), float, each row summing to 1."""
        targets = torch.nn.functional.one_hot(labels, self.num_classes).to(torch.float32)
        if self.mix_prob < 1 and _uniform(generator) >= self.mix_prob:
            return images, targets
        cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or _uniform(generator) < 0.5)
        lam = _beta(self.cutmix_alpha if cutmix else self.mixup_alpha, generator)
        if cutmix:
            images, lam = _cut(images, lam, generator)
        else:
            images = images.roll(1, 0).mul(1.0 - lam).add_(images.mul(lam))
        return images, targets.roll(1, 0).mul_(1.0 - lam).add_(targets.mul(lam))


def batch_mixer(settings: AugmentSettings, num_classes: int) -> BatchMix | None:
    """The batch mixing augment.mixup_alpha / cutmix_alpha ask for; None where both are 0."""
    if not settings.mixes:
        return None
    return BatchMix(num_classes, settings.mixup_alpha, settings.cutmix_alpha, settings.mix_prob)


def _uniform(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator, device=generator.device))


def _beta(alpha: float, generator: torch.Generator) -> float:
    """One draw of Beta(alpha, alpha), as torch.distributions.Beta samples it (a Dirichlet's
    first component), but from `generator`: v2.MixUp and CutMix draw from the global stream."""
    concentration = torch.tensor([alpha, alpha], device=generator.device)
    return float(torch._sample_dirichlet(concentration, generator=generator)[0])


def _cut(images: torch.Tensor, lam: float, generator: torch.Generator) -> tuple[torch.Tensor, float]:
    """v2.CutMix's box around a uniform centre, with sides sqrt(1 - lam) of the image's (clipped
    at the edges), pasted from the paired image; lambda adjusted to the area kept."""
    height, width = images.shape[-2:]
    centre_x = int(torch.randint(width, (), generator=generator, device=generator.device))
    centre_y = int(torch.randint(height, (), generator=generator, device=generator.device))
    r = 0.5 * math.sqrt(1.0 - lam)
    half_w, half_h = int(r * width), int(r * height)
    x1, y1 = max(centre_x - half_w, 0), max(centre_y - half_h, 0)
    x2, y2 = min(centre_x + half_w, width), min(centre_y + half_h, height)
    mixed = images.clone()
    mixed[..., y1:y2, x1:x2] = images.roll(1, 0)[..., y1:y2, x1:x2]
    return mixed, 1.0 - (x2 - x1) * (y2 - y1) / (width * height)
