"""data.gpu_augment: torchvision's crop and flip parameters drawn in the workers, the crops
rendered per batch as torchvision renders them. A run that trains with it: tests/e2e/test_train.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from helpers import compose_cfg
from visiontune import VisiontuneError, augment, config, data
from visiontune.runtime import Runtime

SIZE = 32  # the rendered side; the workers cap shorter sides at DECODED_SIDE_FACTOR x SIZE = 64
CAP = data.DECODED_SIDE_FACTOR * SIZE


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[tuple[str, int]]:
    """Real JPEGs of different sizes and shapes: four of noise (the hardest case for resampling),
    then two smoother ones, as photos are, larger than the cap, so that they travel shrunk with
    their boxes scaled."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(3)
    samples = []
    for i, (width, height) in enumerate([(48, 40), (40, 61), (90, 30), (57, 57), (160, 96), (80, 200)]):
        path = folder / f"photo_{i}.jpg"
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        if width * height > CAP * CAP:  # details a few pixels wide
            image = image.resize((width // 4, height // 4)).resize((width, height), Image.Resampling.BICUBIC)
        image.save(path, quality=95)
        samples.append((str(path), i % 2))
    return samples


def train_split(samples, gpu_augment: bool, seed: int = 7) -> data.ImageFiles:
    return data.ImageFiles(samples, data.transforms(SIZE, gpu_augment)["train"], seed=seed)


def whole_pixels(crop: augment.Crop) -> tuple[int, int, int, int]:
    top, left, height, width = crop.box
    assert all(float(v).is_integer() for v in crop.box), "an image below the cap keeps its whole-pixel box"
    return int(top), int(left), int(height), int(width)


def test_each_image_draws_exactly_the_cpu_paths_crop_and_flip(photos):
    """Under the same (seed, epoch, index) the workers draw the parameters the CPU transforms
    use: torchvision's resized_crop and flip with them give the CPU path's image, bit for bit."""
    small = photos[:4]
    cpu, gpu = train_split(small, False), train_split(small, True)
    for index in range(40 * len(small)):  # 40 epochs of each image: indices carry their epoch
        expected, label = cpu[index]
        crop, same_label = gpu[index]
        drawn = F.resized_crop(crop.pixels, *whole_pixels(crop), [SIZE, SIZE], antialias=True)
        drawn = F.horizontal_flip(drawn) if crop.flip else drawn
        assert torch.equal(drawn, expected), f"index {index}: box {crop.box}, flip {crop.flip}"
        assert label == same_label


def test_the_same_seed_epoch_and_image_draw_the_same_parameters(photos):
    first, again, other = train_split(photos, True), train_split(photos, True), train_split(photos, True, 8)
    for index in (0, 5, 6 * 3 + 2):
        assert (first[index][0].box, first[index][0].flip) == (again[index][0].box, again[index][0].flip)
    assert [first[i][0].box for i in range(12)] != [other[i][0].box for i in range(12)]


def reference_law(height: int, width: int, rng: np.random.Generator) -> tuple[int, int]:
    """(h, w) of one crop, by RandomResizedCrop's documented law written out independently:
    area uniform in [0.08, 1] of the image, aspect ratio log-uniform in [3/4, 4/3], ten tries to
    fit, then a centre crop of the whole image clamped to the ratio range."""
    low, high = math.log(3 / 4), math.log(4 / 3)
    for _ in range(10):
        area = height * width * rng.uniform(0.08, 1.0)
        ratio = math.exp(rng.uniform(low, high))
        w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < w <= width and 0 < h <= height:
            return h, w
    if width / height < 3 / 4:
        return round(width / (3 / 4)), width
    if width / height > 4 / 3:
        return height, round(height * 4 / 3)
    return height, width


def test_crop_distribution_is_randomresizedcrops_and_half_the_images_flip(photos):
    """Over many (epoch, image) draws through the dataset, shrunk images included, the crops'
    area fraction and log aspect ratio follow RandomResizedCrop's law (two-sample KS tests),
    and flips come up half the time."""
    from scipy.stats import ks_2samp

    dataset = train_split(photos, True)
    dataset.decoded = [dataset.read(path) for path, _ in photos]  # as decode_once: not decoded per draw
    sizes = [tuple(pixels.shape[-2:]) for pixels in dataset.decoded]
    rng = np.random.default_rng(0)
    drawn, expected, flips = [], [], []
    for index in range(400 * len(photos)):
        crop = dataset[index][0]
        height, width = sizes[index % len(photos)]
        top, left, h, w = crop.box
        shrunk_h, shrunk_w = crop.pixels.shape[-2:]
        assert top >= 0 and top + h <= shrunk_h + 1e-4 and left >= 0 and left + w <= shrunk_w + 1e-4
        # In the full image's pixels: the box scaled back from the shrunk copy.
        h, w = h * height / shrunk_h, w * width / shrunk_w
        drawn.append((h * w / (height * width), math.log(w / h)))
        ref_h, ref_w = reference_law(height, width, rng)
        expected.append((ref_h * ref_w / (height * width), math.log(ref_w / ref_h)))
        flips.append(crop.flip)
    drawn, expected = np.array(drawn), np.array(expected)
    for column, name in enumerate(("area fraction", "log aspect ratio")):
        result = ks_2samp(drawn[:, column], expected[:, column])
        assert result.pvalue > 1e-3, f"{name}: KS statistic {result.statistic:.4f}, p {result.pvalue:.2g}"
    assert drawn[:, 0].min() >= 0.07 and drawn[:, 0].max() <= 1 + 1e-6
    assert abs(np.mean(flips) - 0.5) < 4 * 0.5 / math.sqrt(len(flips))  # 4 sigma


def test_every_image_of_a_batch_has_its_own_parameters(photos):
    loader = data.build_loaders(
        {"train": photos, "val": photos},
        data.LoaderSettings(input_size=SIZE, batch_size=6, num_workers=0, seed=1, gpu_augment=True),
    )["train"]
    batch, labels = next(iter(loader))
    assert isinstance(batch, augment.CropBatch) and labels.shape == (6,)
    assert len({tuple(box.tolist()) for box in batch.boxes}) == 6
    # Padded to the largest height and width once shrunk: 80x200 -> 64x160, 160x96 -> 106x64.
    assert batch.images.shape == (6, 3, 160, 106) and batch.images.dtype == torch.uint8
    rendered = Runtime(torch.device("cpu"), normalize=torch.nn.Identity()).inputs(batch, labels)[0]
    assert rendered.shape == (6, 3, SIZE, SIZE) and rendered.dtype == torch.float32


def crops_of(samples, seed: int = 11) -> list[augment.Crop]:
    dataset = train_split(samples, True, seed)
    return [dataset[index][0] for index in range(3 * len(samples))]  # three epochs: flips both ways


def test_a_batch_renders_as_torchvision_renders_each_image(photos):
    """Differently sized images, boxes and flips in one batch: each rendered crop is torchvision's
    antialiased resized_crop (then flip) of its image. Measured: identical to torch's float
    resize within 1e-4 before rounding; against its uint8 kernel (fixed-point weights) at most
    1 level of 255 apart, on about 15% of the values."""
    crops = crops_of(photos[:4])
    assert {c.flip for c in crops} == {True, False}
    rendered = augment.collate(crops).render()
    assert rendered.shape == (len(crops), 3, SIZE, SIZE)
    for crop, image in zip(crops, rendered, strict=True):
        box = whole_pixels(crop)
        as_float = F.resized_crop(crop.pixels.float(), *box, [SIZE, SIZE], antialias=True)
        as_uint8 = F.resized_crop(crop.pixels, *box, [SIZE, SIZE], antialias=True)
        if crop.flip:
            as_float, as_uint8 = F.horizontal_flip(as_float), F.horizontal_flip(as_uint8)
        assert (image - as_float).abs().max() <= 0.5 + 1e-3  # the same values, rounded
        off = (image - as_uint8.float()).abs()
        assert off.max() <= 1 and off.mean() < 0.3


def test_a_shrunk_image_renders_close_to_cropping_the_full_one(photos):
    """Images over the cap travel shrunk, their box in fractional pixels: the crop comes out close
    to the CPU path's crop of the full image (measured here: mean 0.4 to 0.8 levels of 255, at
    most 5; about 12 on pure noise, which resampling twice blurs most). decode_once's cache
    shrinks the images the same way for the CPU path too."""
    big = photos[4:]
    crops = crops_of(big)
    rendered = augment.collate(crops).render()
    full = train_split(big, False, seed=11)  # the CPU path: the same draws, on the full images
    for index, image in enumerate(rendered):
        expected = full[index][0].float()
        off = (image - expected).abs()
        assert off.mean() < 1.5 and off.max() <= 10


def test_boxes_at_the_edges_of_shrunk_images_never_reach_the_padding():
    """Boxes scaled by uneven factors, up to each edge, next to a larger image: a flat grey comes
    out flat, with no zeros from the padding mixed in."""
    images = [torch.full((3, h, w), 200, dtype=torch.uint8) for h, w in [(160, 64), (64, 106), (250, 250)]]
    crops = []
    for pixels, (height, width) in zip(images, [(200, 80), (96, 160), (250, 250)], strict=True):
        sy, sx = pixels.shape[1] / height, pixels.shape[2] / width
        for top, left in [(0, 0), (13, 7), (height - 37, width - 29)]:
            box = (top * sy, left * sx, (height - top) * sy, (width - left) * sx)
            crops.append(augment.Crop(pixels, box, top % 2 == 1, SIZE))
    assert torch.equal(augment.collate(crops).render(), torch.full((len(crops), 3, SIZE, SIZE), 200.0))


def test_the_batch_travels_like_a_tensor():
    crops = [augment.Crop(torch.full((3, 5, 7), 9, dtype=torch.uint8), (0.0, 0.0, 5.0, 7.0), False, 4)]
    batch = augment.collate(crops)
    moved = batch.to(torch.device("cpu"), non_blocking=True)
    assert isinstance(moved, augment.CropBatch) and len(moved) == 1
    assert torch.equal(moved.render(), torch.full((1, 3, 4, 4), 9.0))
    if torch.cuda.is_available():  # DataLoader's pin_memory calls the batch's own
        from torch.utils.data._utils.pin_memory import pin_memory

        assert pin_memory(batch).images.is_pinned()


def test_auto_renders_on_cuda_only():
    assert augment.enabled("auto", torch.device("cuda", 0))
    assert not augment.enabled("auto", torch.device("cpu"))
    assert augment.enabled(True, torch.device("cpu")) and not augment.enabled(False, torch.device("cuda"))


@pytest.mark.parametrize("value", ["maybe", "1"])
def test_a_bad_value_is_refused_by_name(value):
    with pytest.raises(VisiontuneError, match=f"data.gpu_augment={value} must be auto"):
        config.read(compose_cfg(f"data.gpu_augment={value}"))
