"""data/loaders.py: real images batched, skipped, decoded once, replayed, shuffled per epoch and shard."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import make_image_folder
from visiontune import VisiontuneError, data


def test_loaders_batch_real_images(tiny_folder):
    _, samples = data.find_samples(tiny_folder)
    loaders = data.build_loaders(
        samples, data.LoaderSettings(input_size=64, batch_size=5, num_workers=0, seed=0)
    )
    images, labels = next(iter(loaders["train"]))
    assert images.shape == (5, 3, 64, 64) and labels.shape == (5,)
    assert sum(len(b[1]) for b in loaders["val"]) == 8


def test_replay_loader_decodes_once(tiny_folder):
    _, samples = data.find_samples(tiny_folder)
    loader = data.ReplayLoader(data.build_loaders(samples, data.LoaderSettings(32, 3, 0, 0))["val"])
    first = list(loader)
    # Later passes replay the same tensors without touching the files.
    loader.loader = None
    second = list(loader)
    assert len(first) == len(second) == 3
    assert all(a[0] is b[0] and torch.equal(a[1], b[1]) for a, b in zip(first, second, strict=True))


def test_max_image_pixels_holds_in_worker_processes(tiny_folder):
    _, samples = data.find_samples(tiny_folder)  # 48 x 40 = 1,920 pixels each
    settings = data.LoaderSettings(32, 4, num_workers=1, seed=0, skip_bad=True, max_image_pixels=1000)
    loader = data.build_loaders(samples, settings)["train"]
    for _ in range(2):  # the second pass reuses the persistent worker
        assert list(loader) == [] and loader.skipped == len(samples["train"])
    with pytest.raises(VisiontuneError, match=r"1,920 pixels, over the limit of 1,000"):
        data.drop_unreadable(samples["train"], skip=False, max_image_pixels=1000)


def _truncated_jpeg(path: Path) -> Path:
    """A real JPEG cut just after its header: it opens, but its pixels do not decode."""
    pixels = np.random.default_rng(1).integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    whole = path.read_bytes()
    path.write_bytes(whole[: whole.index(b"\xff\xda") + 20])  # up to the start of the scan
    assert data.drop_unreadable([(str(path), 0)], skip=False) == ([(str(path), 0)], 0)
    return path


def test_batches_left_empty_are_skipped(tmp_path):
    root = make_image_folder(tmp_path / "d", {"train": 1, "val": 1})
    _truncated_jpeg(root / "train" / "ants" / "cut.jpg")
    _truncated_jpeg(root / "val" / "bees" / "cut.jpg")
    checked = data.check_folder(root, skip_bad=True)
    assert checked.skipped == 0  # their headers pass: they fail only when decoded
    loaders = data.build_loaders(checked.samples, data.LoaderSettings(32, 1, 0, 0, skip_bad=True))
    for split, loader in loaders.items():
        batches = list(loader)
        assert [tuple(images.shape) for images, _ in batches] == [(1, 3, 32, 32)] * 2, split
        assert loader.skipped == 1 and len(loader) == 3


def test_skipped_images_are_counted_per_pass(tmp_path):
    root = make_image_folder(tmp_path / "d", {"train": 3, "val": 1})
    _truncated_jpeg(root / "train" / "bees" / "cut.jpg")
    _, samples = data.find_samples(root)
    loader = data.build_loaders(samples, data.LoaderSettings(32, 4, 0, 0, skip_bad=True))["train"]
    for _ in range(2):
        assert sum(len(labels) for _, labels in loader) == 6
        assert loader.skipped == 1


def epoch_batches(loader, epoch: int) -> list:
    loader.set_epoch(epoch)
    return [(images.clone(), labels.clone()) for images, labels in loader]


def test_training_images_decoded_once_give_the_same_batches_without_reopening_files(tmp_path):
    root = make_image_folder(tmp_path / "data", {"train": 5, "val": 1}, size=(60, 45))
    samples = data.find_samples(root)[1]
    plain = data.build_loaders(samples, data.LoaderSettings(32, 4, num_workers=0, seed=3))["train"]
    cached_settings = data.LoaderSettings(32, 4, num_workers=1, seed=3, train_cache_bytes=2**20)
    cached = data.build_loaders(samples, cached_settings)["train"]
    assert cached.loader.dataset.decoded is not None
    expected = [epoch_batches(plain, epoch) for epoch in (1, 2)]
    for path, _ in samples["train"]:
        Path(path).write_bytes(b"gone")  # later epochs must not need the files
    for epoch, batches in zip((1, 2), expected, strict=True):
        got = epoch_batches(cached, epoch)
        assert len(got) == len(batches) == 3
        for (images, labels), (want_images, want_labels) in zip(got, batches, strict=True):
            assert torch.equal(images, want_images) and torch.equal(labels, want_labels)


def test_decoded_training_images_keep_a_bounded_size_and_budget(tmp_path, caplog):
    root = make_image_folder(tmp_path / "data", {"train": 40, "val": 1}, size=(400, 300))
    samples = data.find_samples(root)[1]
    settings = data.LoaderSettings(32, 4, num_workers=0, seed=0, train_cache_bytes=2**21)
    decoded = data.build_loaders(samples, settings)["train"].loader.dataset.decoded
    assert decoded is not None and {tuple(d.shape) for d in decoded} == {(3, 64, 85)}, "shorter side 2 x 32"
    caplog.set_level(logging.INFO, logger="visiontune.data")
    small = data.LoaderSettings(32, 4, num_workers=0, seed=0, train_cache_bytes=100_000)
    loader = data.build_loaders(samples, small)["train"]
    assert loader.loader.dataset.decoded is None, "over budget: each epoch decodes again"
    assert "would pass the cache budget" in caplog.text
    assert sum(len(labels) for _, labels in loader) == 80


@pytest.mark.parametrize("size", [9, 10, 1])
def test_training_shards_of_two_ranks_make_one_shuffled_epoch(size):
    """As DistributedSampler: equal lengths (padded from the start of the order), one order split."""
    whole = data.EpochShuffle(size, seed=3)
    shards = [data.EpochShuffle(size, seed=3, rank=rank, world=2) for rank in (0, 1)]
    for sampler in (whole, *shards):
        sampler.set_epoch(2)
    order = list(whole)
    taken = [list(shard) for shard in shards]
    assert len(taken[0]) == len(taken[1]) == len(shards[0]) == -(-size // 2)
    interleaved = [i for pair in zip(*taken, strict=True) for i in pair]
    assert interleaved[:size] == order and set(interleaved) == set(order)
