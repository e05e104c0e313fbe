"""data/images.py: real decoding (16-bit, EXIF, truncated files, decompression bombs), transforms, normalisation."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import make_image_folder
from visiontune import VisiontuneError, data


@pytest.mark.parametrize("split", ["train", "val"])
def test_transforms_give_the_model_input_size(tiny_folder, split):
    _, samples = data.find_samples(tiny_folder)
    dataset = data.ImageFiles(samples[split], data.transforms(72)[split])
    image, label = dataset[0]
    assert image.shape == (3, 72, 72) and image.dtype == torch.uint8
    assert image.float().std() > 10 and label in (0, 1)  # real pixels, not a blank


def test_normalizer_matches_torchvision_normalize():
    from torchvision.transforms import v2

    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    expected = v2.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)(images.float() / 255)
    torch.testing.assert_close(data.Normalizer(torch.device("cpu"))(images), expected)


def test_truncated_image_fails_at_decode_with_its_name(tmp_path):
    root = make_image_folder(tmp_path / "d", {"train": 1, "val": 1}, size=(300, 200))
    path = next((root / "train" / "ants").glob("*.jpg"))
    path.write_bytes(path.read_bytes()[:400])  # the header parses, the pixels are gone
    dataset = data.ImageFiles([(str(path), 0)], data.transforms(32)["val"])
    with pytest.raises(VisiontuneError, match=path.name):
        dataset[0]
    assert data.ImageFiles([(str(path), 0)], data.transforms(32)["val"], skip_bad=True)[0] is None


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
