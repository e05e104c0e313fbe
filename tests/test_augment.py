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


# --- the augment group: policies and random erasing, drawn per image -------------------------------

POLICY_NAMES = ["trivialaugment", "randaugment", "autoaugment"]


def augment_settings(*overrides: str) -> config.AugmentSettings:
    return config.read(compose_cfg(*overrides)).augment


def policy_split(samples, settings, gpu_augment: bool, seed: int = 7) -> data.ImageFiles:
    return data.ImageFiles(samples, data.transforms(SIZE, gpu_augment, settings)["train"], seed=seed)


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_the_workers_draw_exactly_what_the_cpu_paths_policy_and_erasing_apply(photos, name):
    """Under the same (seed, epoch, index), the ops and rectangle drawn in the workers, applied by
    apply_drawn to the crop, give the CPU path's image bit for bit: the same random calls of
    torchvision's own classes, in the same order."""
    settings = augment_settings(f"augment={name}", "augment.random_erasing=0.5")
    small = photos[:4]
    cpu, gpu = policy_split(small, settings, False), policy_split(small, settings, True)
    drawn_ops = set()
    for index in range(6 * len(small)):
        expected, _ = cpu[index]
        crop, _ = gpu[index]
        cropped = F.resized_crop(crop.pixels, *whole_pixels(crop), [SIZE, SIZE], antialias=True)
        cropped = F.horizontal_flip(cropped) if crop.flip else cropped
        assert torch.equal(augment.apply_drawn(cropped, crop.ops, crop.erase), expected), f"index {index}"
        drawn_ops.update(op for op, _ in crop.ops)
    assert len(drawn_ops) > 3


def test_the_device_renders_the_drawn_policy_as_the_cpu_path_does(photos):
    """A batch with a policy and erasing renders, image by image, as apply_drawn on torchvision's
    crop of the same box: the crops agree to rounding, and the ops keep them close (measured: a
    value in a few hundred off by more than 1, where a colour op's threshold falls between them)."""
    settings = augment_settings("augment=trivialaugment", "augment.random_erasing=0.5")
    dataset = policy_split(photos[:4], settings, True, seed=3)
    crops = [dataset[index][0] for index in range(12)]
    assert any(c.erase for c in crops) and any(c.ops for c in crops)
    rendered = augment.collate(crops).render()
    for crop, image in zip(crops, rendered, strict=True):
        as_float = F.resized_crop(crop.pixels.float(), *whole_pixels(crop), [SIZE, SIZE], antialias=True)
        as_float = F.horizontal_flip(as_float) if crop.flip else as_float
        expected = augment.apply_drawn(as_float.round().clamp(0, 255).to(torch.uint8), crop.ops, crop.erase)
        off = (image - expected.float()).abs()
        assert off.mean() < 1.0, (crop.ops, off.mean())
        if crop.erase:
            top, left, height, width = crop.erase
            patch = image[:, top : top + height, left : left + width]
            assert torch.equal(
                patch, torch.tensor(augment.ERASE_VALUE).float()[:, None, None].expand_as(patch)
            )


@pytest.mark.parametrize("gpu_augment", [False, True])
def test_the_same_seed_epoch_and_image_give_the_same_augmented_image(photos, gpu_augment):
    settings = augment_settings("recipe=strong")
    first, again = (
        policy_split(photos[:3], settings, gpu_augment),
        policy_split(photos[:3], settings, gpu_augment),
    )
    other = policy_split(photos[:3], settings, gpu_augment, seed=8)

    def rendered(dataset, index):
        item = dataset[index][0]
        return augment.collate([item]).render()[0] if gpu_augment else item

    for index in (0, 4, 8):
        assert torch.equal(rendered(first, index), rendered(again, index))
    assert any(not torch.equal(rendered(first, i), rendered(other, i)) for i in range(6))


def stand_in() -> torch.Tensor:
    return torch.zeros(1, dtype=torch.uint8).expand(3, SIZE, SIZE)


def drawn_many(transform, n: int, seed: int = 0) -> list:
    torch.manual_seed(seed)
    return [transform.draw(stand_in()) for _ in range(n)]


# TrivialAugment Wide's law (Müller & Hutter; torchvision's table written out): 14 ops at even odds,
# a strength bin from 0 to 30 at even odds, ops with a direction signed at even odds.
TRIVIAL_MAX = {"ShearX": 0.99, "ShearY": 0.99, "TranslateX": 32.0, "TranslateY": 32.0, "Rotate": 135.0}
TRIVIAL_MAX |= dict.fromkeys(["Brightness", "Color", "Contrast", "Sharpness"], 0.99)
TRIVIAL_UNSIGNED = {"Identity", "Posterize", "Solarize", "AutoContrast", "Equalize"}


def test_trivialaugment_draws_one_op_of_fourteen_and_a_strength_of_31_bins_at_even_odds():
    from scipy.stats import chisquare

    draws = drawn_many(augment.policy(augment_settings("augment=trivialaugment"), drawn=True), 4200)
    assert all(len(ops) == 1 for ops in draws)
    names = sorted(TRIVIAL_MAX.keys() | TRIVIAL_UNSIGNED)
    counts = [sum(ops[0][0] == name for ops in draws) for name in names]
    assert chisquare(counts).pvalue > 1e-3, dict(zip(names, counts, strict=True))
    signed = [(name, m) for ((name, m),) in draws if name in TRIVIAL_MAX]
    bins = [round(abs(m) / TRIVIAL_MAX[name] * 30) for name, m in signed]
    for (name, m), b in zip(signed, bins, strict=True):
        assert abs(abs(m) - TRIVIAL_MAX[name] * b / 30) < 1e-4 * TRIVIAL_MAX[name]  # on the grid
    assert chisquare(np.bincount(bins, minlength=31)).pvalue > 1e-3
    negative = sum(m < 0 for _, m in signed if m != 0) / sum(m != 0 for _, m in signed)
    assert abs(negative - 0.5) < 4 * 0.5 / math.sqrt(len(signed))


def test_randaugment_draws_num_ops_ops_at_the_one_magnitude():
    from scipy.stats import chisquare

    settings = augment_settings("augment=randaugment", "augment.num_ops=3", "augment.magnitude=12")
    draws = drawn_many(augment.policy(settings, drawn=True), 1400)
    assert all(len(ops) == 3 for ops in draws)
    ops = [op for drawn in draws for op in drawn]
    names = sorted({name for name, _ in ops})
    assert len(names) == 14 and "Invert" not in names
    assert chisquare([sum(n == name for n, _ in ops) for name in names]).pvalue > 1e-3
    # Bin 12 of 31: Rotate's 0..30 degrees at 12, Brightness's 0..0.9 at 0.36, either sign.
    assert {round(abs(m), 4) for n, m in ops if n == "Rotate"} == {12.0}
    assert {round(abs(m), 4) for n, m in ops if n == "Brightness"} == {0.36}


def test_autoaugment_draws_from_imagenets_25_pairs_each_op_at_its_probability():
    from torchvision.transforms import v2

    pairs = v2.AutoAugment()._policies
    draws = drawn_many(augment.policy(augment_settings("augment=autoaugment"), drawn=True), 3000)
    names = [tuple(name for name, _ in ops) for ops in draws]
    possible = {
        tuple(op[0] for op, keep in zip(pair, mask, strict=True) if keep)
        for pair in pairs
        for mask in [(1, 1), (1, 0), (0, 1), (0, 0)]
    }
    assert set(names) <= possible
    expected = sum(p1 + p2 for (_, p1, _), (_, p2, _) in pairs) / len(pairs)  # ops per image
    mean = np.mean([len(n) for n in names])
    assert abs(mean - expected) < 0.05, (mean, expected)


def test_random_erasing_erases_at_its_rate_within_its_area_range():
    erasing = augment.DrawnErasing(0.3, value=augment.ERASE_VALUE)
    boxes = drawn_many(erasing, 4000)
    erased = [b for b in boxes if b is not None]
    assert abs(len(erased) / len(boxes) - 0.3) < 4 * math.sqrt(0.3 * 0.7 / len(boxes))
    areas = np.array([h * w / SIZE**2 for _, _, h, w in erased])
    assert areas.min() >= 0.015 and areas.max() <= 0.36  # scale (0.02, 0.33), sides rounded
    assert all(t + h <= SIZE and left + w <= SIZE for t, left, h, w in erased)


def test_the_tutorial_stays_crop_and_flip_exactly():
    """augment=tutorial (the default) draws and renders what the transforms did before the group."""
    from torchvision.transforms import v2

    settings = augment_settings()
    assert settings.name == "tutorial" and augment.policy(settings) is None
    transform = data.transforms(SIZE, False, settings)["train"]
    assert [type(t) for t in transform.transforms] == [v2.RandomResizedCrop, v2.RandomHorizontalFlip]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("augment.random_erasing=1.5", "augment.random_erasing=1.5 is a probability"),
        ("augment.mixup_alpha=-1", "augment.mixup_alpha=-1 must be 0 or a positive number"),
        ("augment.name=cutout", "augment.name=cutout must be one of tutorial"),
    ],
)
def test_a_bad_augment_value_is_refused_by_name(override, message):
    with pytest.raises(VisiontuneError, match=message):
        config.read(compose_cfg(override))


# --- mixup and cutmix: whole batches, drawn from the loop's generator ------------------------------


def two_images(n: int = 2, side: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i all of value i: a mixed image shows how much of each it took."""
    images = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 3, side, side).clone()
    return images, torch.arange(n)


@pytest.mark.parametrize("name", ["tutorial", *POLICY_NAMES])
def test_every_augment_option_takes_the_mixing_keys(name):
    settings = augment_settings(f"augment={name}", "augment.mixup_alpha=0.2", "augment.cutmix_alpha=1.0")
    mixer = augment.batch_mixer(settings, num_classes=5)
    assert mixer == augment.BatchMix(5, 0.2, 1.0, 1.0)
    assert augment.batch_mixer(augment_settings(f"augment={name}"), 5) is None


@pytest.mark.parametrize(("mixup", "cutmix"), [(0.2, 0.0), (0.0, 1.0), (0.2, 1.0)])
def test_soft_targets_sum_to_one_and_weigh_each_image_as_its_pixels_do(mixup, cutmix):
    """Image 0 is all 0, image 1 all 1: the share of image 1 in mixed image 0 (its mean) is the
    weight its target gives class 1, for mixup's blend and cutmix's pasted box alike."""
    mixer = augment.BatchMix(3, mixup, cutmix)
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        images, labels = two_images()
        mixed, targets = mixer(images, labels, generator)
        assert targets.shape == (2, 3) and targets.dtype == torch.float32
        assert torch.allclose(targets.sum(1), torch.ones(2))
        assert targets[:, 2].eq(0).all()
        assert mixed[0].mean().item() == pytest.approx(targets[0, 1].item(), abs=1e-6)
        assert 1 - mixed[1].mean().item() == pytest.approx(targets[1, 0].item(), abs=1e-6)


def test_mixups_lambda_is_beta_alpha_alpha():
    from scipy.stats import beta, kstest

    mixer = augment.BatchMix(2, 0.4, 0.0)
    generator = torch.Generator().manual_seed(1)
    lams = [mixer(*two_images(side=1), generator)[1][0, 0].item() for _ in range(2000)]
    assert kstest(lams, beta(0.4, 0.4).cdf).pvalue > 1e-3


def test_cutmix_and_mixup_share_the_batches_and_mix_prob_leaves_the_rest():
    """Both on: each mixed batch is a blend (one value everywhere) or a pasted box (two values) at
    even odds; mix_prob=0.5 leaves half of the batches as they were, their targets one-hot."""
    mixer = augment.BatchMix(2, 1.0, 1.0, mix_prob=0.5)
    generator = torch.Generator().manual_seed(2)
    kinds = []
    for _ in range(1200):
        images, labels = two_images()
        mixed, targets = mixer(images, labels, generator)
        if torch.equal(targets, torch.eye(2)):
            kinds.append("none")
        else:
            kinds.append("cutmix" if mixed[0].unique().numel() > 1 else "mixup")
    share = {kind: kinds.count(kind) / len(kinds) for kind in ("none", "mixup", "cutmix")}
    sigma = math.sqrt(0.25 / len(kinds))
    assert abs(share["none"] - 0.5) < 4 * sigma
    assert abs(share["mixup"] - 0.25) < 4 * sigma and abs(share["cutmix"] - 0.25) < 4 * sigma


def test_a_seeded_generator_mixes_alike_and_the_global_stream_is_untouched():
    images = torch.rand(6, 3, 16, 16)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    mixer = augment.BatchMix(3, 0.2, 1.0)
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    first = [mixer(images, labels, torch.Generator().manual_seed(9)) for _ in range(2)]
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(first[0][0], first[1][0]) and torch.equal(first[0][1], first[1][1])
    generator = torch.Generator().manual_seed(9)
    runs = [mixer(images, labels, generator)[1] for _ in range(4)]
    assert any(not torch.equal(runs[0], run) for run in runs[1:])
