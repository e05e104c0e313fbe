"""Folder checks, real decoding, transforms and the verified download, all on local files."""

from __future__ import annotations

import hashlib
import logging
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SHARED_DATA, compose_cfg, make_image_folder
from visiontune import VisiontuneError, data


def test_find_samples_labels_every_image(tiny_folder):
    classes, samples = data.find_samples(tiny_folder)
    assert classes == ["ants", "bees"]
    assert len(samples["train"]) == 12 and len(samples["val"]) == 8
    assert {label for _, label in samples["val"]} == {0, 1}
    assert all(Path(p).parent.name == classes[label] for p, label in samples["train"])


@pytest.mark.parametrize("split", ["train", "val"])
def test_transforms_give_the_model_input_size(tiny_folder, split):
    _, samples = data.find_samples(tiny_folder)
    dataset = data.ImageFiles(samples[split], data.transforms(72)[split])
    image, label = dataset[0]
    assert image.shape == (3, 72, 72) and image.dtype == torch.uint8
    assert image.float().std() > 10 and label in (0, 1)  # real pixels, not a blank


def test_loaders_batch_real_images(tiny_folder):
    _, samples = data.find_samples(tiny_folder)
    loaders = data.build_loaders(
        samples, data.LoaderSettings(input_size=64, batch_size=5, num_workers=0, seed=0)
    )
    images, labels = next(iter(loaders["train"]))
    assert images.shape == (5, 3, 64, 64) and labels.shape == (5,)
    assert sum(len(b[1]) for b in loaders["val"]) == 8


def test_normalizer_matches_torchvision_normalize():
    from torchvision.transforms import v2

    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    expected = v2.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)(images.float() / 255)
    torch.testing.assert_close(data.Normalizer(torch.device("cpu"))(images), expected)


def test_replay_loader_decodes_once(tiny_folder):
    _, samples = data.find_samples(tiny_folder)
    loader = data.ReplayLoader(data.build_loaders(samples, data.LoaderSettings(32, 3, 0, 0))["val"])
    first = list(loader)
    # Later passes replay the same tensors without touching the files.
    loader.loader = None
    second = list(loader)
    assert len(first) == len(second) == 3
    assert all(a[0] is b[0] and torch.equal(a[1], b[1]) for a, b in zip(first, second, strict=True))


def test_missing_root_says_how_to_point_at_data(tmp_path):
    with pytest.raises(VisiontuneError, match="does not exist.*data.root="):
        data.prepare_root(tmp_path / "nowhere", None, None, None)


@pytest.mark.parametrize("split", ["train", "val"])
def test_missing_split(tmp_path, split):
    root = make_image_folder(tmp_path / "d", {"train": 1, "val": 1})
    shutil.rmtree(root / split)
    with pytest.raises(VisiontuneError, match=f"{split} is missing"):
        data.find_samples(root)


def test_different_class_folders(tmp_path):
    root = make_image_folder(tmp_path / "d", {"train": 1, "val": 1})
    make_image_folder(root, {"val": 1}, classes=("wasps",))
    with pytest.raises(VisiontuneError, match=r"only in val \['wasps'\]"):
        data.find_samples(root)


def test_split_without_images(tmp_path):
    root = make_image_folder(tmp_path / "d", {"train": 1, "val": 1})
    for image in (root / "val").rglob("*.jpg"):
        image.unlink()
    with pytest.raises(VisiontuneError, match="no images"):
        data.find_samples(root)


def test_corrupt_image_is_named_or_skipped(tmp_path):
    root = make_image_folder(tmp_path / "d", {"train": 2, "val": 1})
    bad = root / "train" / "ants" / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    _, samples = data.find_samples(root)
    with pytest.raises(VisiontuneError, match="broken.jpg.*skip_bad_images=true"):
        data.drop_unreadable(samples["train"], skip=False)
    kept, skipped = data.drop_unreadable(samples["train"], skip=True)
    assert skipped == 1 and len(kept) == 4 and all("broken" not in p for p, _ in kept)


def test_truncated_image_fails_at_decode_with_its_name(tmp_path):
    root = make_image_folder(tmp_path / "d", {"train": 1, "val": 1}, size=(300, 200))
    path = next((root / "train" / "ants").glob("*.jpg"))
    path.write_bytes(path.read_bytes()[:400])  # the header parses, the pixels are gone
    dataset = data.ImageFiles([(str(path), 0)], data.transforms(32)["val"])
    with pytest.raises(VisiontuneError, match=path.name):
        dataset[0]
    assert data.ImageFiles([(str(path), 0)], data.transforms(32)["val"], skip_bad=True)[0] is None


def _truncated_jpeg(path: Path) -> Path:
    """A real JPEG cut just after its header: it opens, but its pixels do not decode."""
    pixels = np.random.default_rng(1).integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    whole = path.read_bytes()
    path.write_bytes(whole[: whole.index(b"\xff\xda") + 20])  # up to the start of the scan
    assert data.drop_unreadable([(str(path), 0)], skip=False) == ([(str(path), 0)], 0)
    return path


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A decompression bomb's header: a PNG that claims width x height but holds a few bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey, no interlace
    png = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png)
    return path


def _as_decoded(path: Path) -> torch.Tensor:
    """The uint8 tensor ImageFiles hands the transforms, before any resizing."""
    return data.ImageFiles([(str(path), 0)], transform=lambda pixels: pixels)[0][0]


def test_decompression_bomb_is_named_with_its_fix_or_skipped(tmp_path):
    root = make_image_folder(tmp_path / "d", {"train": 2, "val": 1})
    bomb = _png_claiming(root / "train" / "ants" / "bomb.png", 20000, 20000)
    pillow_global = Image.MAX_IMAGE_PIXELS
    with pytest.raises(
        VisiontuneError, match=r"bomb.png claims 400,000,000 pixels.*178,956,970.*max_image_pixels="
    ):
        data.check_folder(root, skip_bad=False)
    checked = data.check_folder(root, skip_bad=True)
    assert checked.skipped == 1 and str(bomb) not in dict(checked.samples["train"])
    # A user who trusts the file raises the limit; the header check then lets it through.
    assert data.check_folder(root, skip_bad=False, max_image_pixels=400_000_000).skipped == 0
    # At decode time too (the file may have changed since the check): named, or skipped.
    with pytest.raises(VisiontuneError, match="bomb.png claims"):
        data.ImageFiles([(str(bomb), 0)], data.transforms(32)["val"])[0]
    assert data.ImageFiles([(str(bomb), 0)], data.transforms(32)["val"], skip_bad=True)[0] is None
    assert pillow_global == Image.MAX_IMAGE_PIXELS  # the process-wide default is left alone


def test_max_image_pixels_holds_in_worker_processes(tiny_folder):
    _, samples = data.find_samples(tiny_folder)  # 48 x 40 = 1,920 pixels each
    settings = data.LoaderSettings(32, 4, num_workers=1, seed=0, skip_bad=True, max_image_pixels=1000)
    loader = data.build_loaders(samples, settings)["train"]
    for _ in range(2):  # the second pass reuses the persistent worker
        assert list(loader) == [] and loader.skipped == len(samples["train"])
    with pytest.raises(VisiontuneError, match=r"1,920 pixels, over the limit of 1,000"):
        data.drop_unreadable(samples["train"], skip=False, max_image_pixels=1000)


def test_a_process_holding_loader_workers_still_exits(tiny_folder):
    """Workers ignore SIGTERM (the main process stops them); multiprocessing's exit hook sends
    exactly that and then waits: a script, notebook or test run holding a loader must not hang."""
    import subprocess
    import sys

    code = (
        "import sys; from pathlib import Path; from visiontune import data\n"
        "classes, samples = data.find_samples(Path(sys.argv[1]))\n"
        "loader = data.build_loaders(samples, data.LoaderSettings(32, 2, num_workers=2, seed=0))['train']\n"
        "next(iter(loader)); held = loader\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tiny_folder)], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()[-2000:]


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


def test_16_bit_grey_keeps_its_brightness(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((20, 24), 32768, dtype=np.uint16)).save(path)
    assert Image.open(path).mode in ("I;16", "I")
    pixels = _as_decoded(path)
    assert pixels.shape == (3, 20, 24) and pixels.dtype == torch.uint8
    assert pixels.min() >= 127 and pixels.max() <= 129  # mid-grey, not clipped to white


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned; rotate 90 degrees to view
    Image.new("RGB", (40, 20), "red").save(path, exif=exif)
    assert _as_decoded(path).shape == (3, 40, 20)  # upright: 20 wide, 40 tall


def test_hidden_files_and_folders_are_not_samples(tmp_path):
    root = make_image_folder(tmp_path / "d", {"train": 1, "val": 1})
    ants = root / "train" / "ants"
    (ants / "2019" / ".ipynb_checkpoints").mkdir(parents=True)
    (ants / ".ipynb_checkpoints").mkdir()
    shutil.copy(next(ants.glob("*.jpg")), ants / ".ipynb_checkpoints" / "x.jpg")
    shutil.copy(next(ants.glob("*.jpg")), ants / "2019" / ".ipynb_checkpoints" / "z.jpg")
    shutil.copy(next(ants.glob("*.jpg")), ants / "2019" / "kept.jpg")
    (ants / "._y.jpg").write_bytes(b"\x00\x05\x16\x07 macOS AppleDouble resource fork")
    (ants / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    _, samples = data.find_samples(root)
    names = sorted(Path(path).relative_to(ants).as_posix() for path, label in samples["train"] if label == 0)
    assert names == ["2019/kept.jpg", "ants_0.jpg"]


def test_class_without_train_images_is_refused(tmp_path):
    root = make_image_folder(tmp_path / "d", {"train": 1, "val": 1})
    for image in (root / "train" / "bees").glob("*.jpg"):
        image.unlink()
    with pytest.raises(VisiontuneError, match=r"\['bees'\] in .*train have no readable images"):
        data.check_folder(root, skip_bad=False)


def test_class_without_val_images_trains_with_a_warning(tmp_path, caplog):
    root = make_image_folder(tmp_path / "d", {"train": 1, "val": 1})
    for image in (root / "val" / "bees").glob("*.jpg"):
        image.unlink()
    with caplog.at_level(logging.WARNING, logger="visiontune.data"):
        checked = data.check_folder(root, skip_bad=False)
    assert checked.classes == ["ants", "bees"] and len(checked.samples["train"]) == 2
    assert "'bees' trains but is never validated" in caplog.text


@pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason="the shared hymenoptera copy is not beside this checkout"
)
def test_hymenoptera_tree_checksum_matches_the_real_data():
    assert data.tree_digest(SHARED_DATA) == compose_cfg().data.tree_sha256


@pytest.fixture
def local_server(tmp_path):
    """A real HTTP server on localhost serving tmp_path/served, for the download code."""
    import functools
    import http.server
    import threading

    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join()


def _zip_folder(folder: Path, archive: Path) -> str:
    shutil.make_archive(str(archive.with_suffix("")), "zip", folder.parent, folder.name)
    return hashlib.md5(archive.read_bytes()).hexdigest()


def test_download_verifies_and_extracts_a_local_archive(tmp_path, local_server):
    served, base = local_server
    source = make_image_folder(tmp_path / "src" / "insects", {"train": 1, "val": 1})
    md5 = _zip_folder(source, served / "insects.zip")
    root = tmp_path / "data" / "my_insects"
    got = data.prepare_root(root, f"{base}/insects.zip", md5, data.tree_digest(source))
    assert got == root
    assert data.find_samples(root)[0] == ["ants", "bees"]
    assert not any(p.name.startswith(".") for p in root.parent.iterdir())


def test_download_with_wrong_checksum_keeps_nothing(tmp_path, local_server):
    served, base = local_server
    source = make_image_folder(tmp_path / "src" / "insects", {"train": 1, "val": 1})
    _zip_folder(source, served / "insects.zip")
    root = tmp_path / "data" / "insects"
    with pytest.raises(VisiontuneError, match="fail their checksum"):
        data.prepare_root(root, f"{base}/insects.zip", None, "0" * 64)
    assert not root.exists() and list((tmp_path / "data").iterdir()) == []


def test_download_with_wrong_archive_md5_is_refused(tmp_path, local_server):
    served, base = local_server
    _zip_folder(make_image_folder(tmp_path / "src" / "insects", {"train": 1, "val": 1}), served / "i.zip")
    root = tmp_path / "data" / "insects"
    with pytest.raises(VisiontuneError, match="could not download"):
        data.prepare_root(root, f"{base}/i.zip", "0" * 32, None)
    assert not root.exists()


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
