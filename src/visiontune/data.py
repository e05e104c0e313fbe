"""Image folders: download and verify, check the layout, decode, transform, batch."""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import multiprocessing
import multiprocessing.util
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from visiontune import VisiontuneError, augment

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLITS = ("train", "val")

Sample = tuple[str, int]


# --- getting the folder ---------------------------------------------------------------------


def prepare_root(root: Path, url: str | None, md5: str | None, tree_sha256: str | None) -> Path:
    """The data folder, downloaded from `url` first if it is missing and a URL is known."""
    if root.exists():
        return root
    if not url:
        raise VisiontuneError(
            f"data.root={root} does not exist. Point data.root at a folder holding train/ and val/ "
            f"class folders (data.root=/path/to/images)."
        )
    download(url, root, md5, tree_sha256)
    return root


def download(url: str, root: Path, md5: str | None, tree_sha256: str | None) -> None:
    """Download and extract the archive at `url` so that its top folder becomes `root`."""
    from torchvision.datasets.utils import download_and_extract_archive

    staging = root.parent / f".{root.name}.download"
    shutil.rmtree(staging, ignore_errors=True)
    log.info("data.root=%s is missing: downloading %s", root, url)
    try:  # whatever happens, the staging folder goes; only a verified tree becomes `root`
        try:
            download_and_extract_archive(url, download_root=str(staging), md5=md5)
        except Exception as err:
            raise VisiontuneError(
                f"could not download {url} for data.root={root}: {err}. On an offline machine, "
                f"unpack the archive yourself and pass data.root=/path/to/its/folder."
            ) from err
        tops = [p for p in staging.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))]
        if len(tops) != 1:
            raise VisiontuneError(f"the archive at {url} should hold one top folder, found {len(tops)}")
        if tree_sha256 and (actual := tree_digest(tops[0])) != tree_sha256:
            raise VisiontuneError(
                f"the files downloaded from {url} fail their checksum (tree sha256 {actual}, "
                f"expected {tree_sha256}): the download is damaged or the archive changed. "
                f"Nothing was kept; run again, or unpack a trusted copy and pass data.root."
            )
        root.parent.mkdir(parents=True, exist_ok=True)
        tops[0].rename(root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def tree_digest(root: Path) -> str:
    """sha256 over the sorted 'relative/path<TAB>sha256(file)' lines of every file below root."""
    lines = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        lines.append(f"{path.relative_to(root).as_posix()}\t{digest}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


# --- checking it ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckedData:
    """A folder that passed the checks: its classes and the readable samples of each split."""

    root: Path
    classes: list[str]
    samples: dict[str, list[Sample]]
    skipped: int  # unreadable images left out up front (with skip_bad)


def check_folder(root: Path, skip_bad: bool, max_image_pixels: int | None = None) -> CheckedData:
    """The layout checked, each image's header read once, and every class left with images."""
    classes, samples = find_samples(root)
    skipped = 0
    for split in SPLITS:
        samples[split], bad = drop_unreadable(samples[split], skip_bad, max_image_pixels)
        skipped += bad
    # After dropping: a class whose every image was unreadable is as empty as an empty folder.
    _check_class_counts(root, classes, samples)
    return CheckedData(root, classes, samples, skipped)


def find_samples(root: Path) -> tuple[list[str], dict[str, list[Sample]]]:
    """Class names and (path, label) samples of each split, after checking the layout."""
    split_classes = {split: class_folders(root, split) for split in SPLITS}
    if split_classes["train"] != split_classes["val"]:
        only_train = sorted(set(split_classes["train"]) - set(split_classes["val"]))
        only_val = sorted(set(split_classes["val"]) - set(split_classes["train"]))
        raise VisiontuneError(
            f"train/ and val/ under {root} have different class folders: only in train {only_train}, "
            f"only in val {only_val}. Both splits need the same class folders."
        )
    classes = split_classes["train"]
    samples = {}
    for split in SPLITS:
        samples[split] = [
            (str(path), label)
            for label, name in enumerate(classes)
            for path in image_files(root / split / name)
        ]
        if not samples[split]:
            raise VisiontuneError(
                f"{root / split} has class folders {classes} but no images in them "
                f"(extensions {', '.join(IMG_EXTENSIONS)})."
            )
    return classes, samples


def class_folders(root: Path, split: str) -> list[str]:
    folder = root / split
    if not folder.is_dir():
        raise VisiontuneError(
            f"{folder} is missing: data.root must hold train/ and val/ folders, each with one "
            f"sub-folder per class (data.root={root})."
        )
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise VisiontuneError(f"{folder} has no class folders: put each class's images in {folder}/<class>/")
    return classes


def image_files(folder: Path) -> list[Path]:
    """Image files at any depth below folder, except hidden ones and those in hidden folders.

    Tools leave look-alike files there: Jupyter's .ipynb_checkpoints/ copies, macOS's ._name.jpg
    resource forks (which no decoder reads). Neither is a sample.
    """
    return sorted(
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in IMG_EXTENSIONS
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
        and path.is_file()
    )


def _check_class_counts(root: Path, classes: list[str], samples: dict[str, list[Sample]]) -> None:
    """Refuse a class with no training images; warn about one that cannot be validated."""
    empty = {split: _classes_without_samples(classes, samples[split]) for split in SPLITS}
    if empty["train"]:
        raise VisiontuneError(
            f"class folder(s) {empty['train']} in {root / 'train'} have no readable images: a class "
            f"needs training images. Add images there, or remove the folder from train/ and val/."
        )
    if not samples["val"]:
        raise VisiontuneError(f"{root / 'val'} has no readable images: put some in its class folders.")
    for name in empty["val"]:
        folder = root / "val" / name
        log.warning("%s has no readable images: class %r trains but is never validated", folder, name)


def _classes_without_samples(classes: list[str], samples: list[Sample]) -> list[str]:
    labels = {label for _, label in samples}
    return [name for label, name in enumerate(classes) if label not in labels]


def drop_unreadable(
    samples: list[Sample], skip: bool, max_image_pixels: int | None = None
) -> tuple[list[Sample], int]:
    """Check each image's header once; fail on the first bad file, or leave bad ones out."""
    good, bad = [], []
    for sample in samples:
        if (problem := _header_problem(sample[0], max_image_pixels)) is None:
            good.append(sample)
        else:
            bad.append((sample[0], problem))
    if bad and not skip:
        # A too-large image has its own fix (raise the limit), so it gets its own message.
        for _, problem in bad:
            if isinstance(problem, TooManyPixels):
                raise problem
        names = ", ".join(path for path, _ in bad[:3])
        raise VisiontuneError(
            f"{len(bad)} image file(s) cannot be read, e.g. {names}. Remove or replace them, or "
            f"pass data.skip_bad_images=true to train without them."
        )
    for path, problem in bad:
        log.warning("skipping unreadable image %s (%s)", path, problem)
    return good, len(bad)


def _header_problem(path: str, max_image_pixels: int | None) -> Exception | None:
    """Why the image at path cannot be used, as far as its header tells; None if it can."""
    try:
        with _pixel_limit(max_image_pixels) as limit, Image.open(path) as image:
            _check_pixels(path, image, limit)
    except (TooManyPixels, UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        return err
    return None


# --- decoding and batching -------------------------------------------------------------------


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


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB; 16-bit greys are scaled down, where convert("RGB") clips them at 255."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        values = np.asarray(image, dtype=np.float32)
        low, high = 0.0, 65535.0
        if values.min() < low or values.max() > high:  # 32-bit data, not from a 16-bit file
            low, high = float(values.min()), float(values.max())
        scaled = (values - low) * (255.0 / max(high - low, 1.0))
        image = Image.fromarray(scaled.round().astype(np.uint8))
    return image.convert("RGB")


class ImageFiles(Dataset):
    """(uint8 image tensor, label) pairs decoded from a list of files; None for a skipped file.

    With `decoded` (from decode_once) the images come from memory: later epochs only crop and flip.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable,
        skip_bad: bool = False,
        max_image_pixels: int | None = None,
        seed: int | None = None,
    ):
        self.samples = list(samples)
        # With a seed, each image's random augmentation is drawn from (seed, epoch, index) alone
        # (indices from EpochShuffle carry their epoch): the same in any worker and after a resume.
        self.seed = seed
        self.transform = transform
        self.skip_bad = skip_bad
        self.max_image_pixels = max_image_pixels
        self.decoded: list[torch.Tensor | None] | None = None  # set by build_loaders where it fits

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        epoch, index = divmod(index, len(self.samples))
        path, label = self.samples[index]
        pixels = self.decoded[index] if self.decoded is not None else self.read(path)
        if pixels is None:
            return None
        if self.seed is None:
            return self.transform(pixels), label
        with torch.random.fork_rng(devices=[]):  # the process's own random stream stays untouched
            torch.manual_seed(_mix(self.seed, epoch, index))
            return self.transform(pixels), label

    def read(self, path: str) -> torch.Tensor | None:
        """The decoded image; None for one that does not decode, where skip_bad allows."""
        try:
            return decode(path, self.max_image_pixels)
        except (TooManyPixels, OSError, SyntaxError, ValueError) as err:
            # A header that passed the up-front check can still hide data that does not decode
            # (a truncated file), and files can change between the check and the decode.
            if self.skip_bad:
                log.warning("skipping image that does not decode: %s (%s)", path, err)
                return None
            if isinstance(err, TooManyPixels):
                raise
            raise VisiontuneError(
                f"image {path} does not decode ({err}). Replace it, or pass "
                f"data.skip_bad_images=true to leave such files out."
            ) from err


# Decoded training images keep their shorter side up to this many times the input size: the
# random crops are then drawn from nearly the original pixels, and 12-megapixel photos do not
# fill the memory budget. Smaller images are kept exactly as decoded.
DECODED_SIDE_FACTOR = 2
PROJECT_AFTER = 32  # images decoded before their average size predicts the whole split's


def decode_once(dataset: ImageFiles, input_size: int, max_bytes: int, threads: int) -> list | None:
    """Every image of `dataset` decoded (threads: Pillow decodes without the GIL), the shorter
    side capped at DECODED_SIDE_FACTOR x input_size; None once they would pass max_bytes."""
    from concurrent.futures import ThreadPoolExecutor

    cap = DECODED_SIDE_FACTOR * input_size

    def load(sample: Sample) -> torch.Tensor | None:
        pixels = dataset.read(sample[0])
        return None if pixels is None else augment.cap_shorter_side(pixels, cap)

    decoded, size, total = [], 0, len(dataset.samples)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for pixels in pool.map(load, dataset.samples):
            size += 0 if pixels is None else pixels.numel()
            decoded.append(pixels)
            # Projected from the first images too: a folder far over budget is not decoded half-way.
            projected = size * total // len(decoded) if len(decoded) >= PROJECT_AFTER else size
            if max(size, projected) > max_bytes:
                pool.shutdown(cancel_futures=True)
                log.info(
                    "decoded training images would pass the cache budget (data.cache_mb, %d MiB left "
                    "after validation's): each epoch decodes them again",
                    max_bytes // 2**20,
                )
                return None
    log.info("training images decoded once: %d MiB kept for later epochs", size // 2**20)
    return decoded


def _mix(*numbers: int) -> int:
    """One seed from several whole numbers, the same in every process (unlike hash of a str)."""
    seed = 0
    for number in numbers:
        seed = (seed * 1_000_003 + number) % 2**63
    return seed


class EpochShuffle(Sampler):
    """A training order that depends on (seed, epoch) alone, so a resumed run draws the same one.

    Each index carries its epoch (epoch * size + i), for ImageFiles to seed the image's augmentation.
    Under torchrun each of `world` ranks takes every world-th index of the same order, padded
    with its first indices to a multiple of `world` as DistributedSampler does: all ranks then
    take the same number of steps, and together they see one shuffled epoch.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1):
        self.size, self.seed, self.epoch = size, seed, 1
        self.rank, self.world = rank, world

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.size // self.world)

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(
            self.size, generator=torch.Generator().manual_seed(_mix(self.seed, self.epoch))
        )
        padded = order.repeat(-(-len(self) * self.world // self.size))[: len(self) * self.world]
        return iter((padded[self.rank :: self.world] + self.epoch * self.size).tolist())


def transforms(input_size: int, gpu_augment: bool = False) -> dict[str, Callable]:
    """The tutorial's geometry on uint8 tensors: random crop and flip to train, centre crop to validate.

    Images stay uint8 until they reach the device, where Normalizer scales a whole batch at once:
    a quarter of the bytes through worker queues and pinned memory, one tensor op per batch.
    With gpu_augment the training crops are only drawn here (the same parameters) and the device
    renders them (augment.py).
    """
    if gpu_augment:
        train = augment.DrawCrop(input_size, cap=DECODED_SIDE_FACTOR * input_size)
    else:
        train = v2.Compose([v2.RandomResizedCrop(input_size, antialias=True), v2.RandomHorizontalFlip()])
    return {
        "train": train,
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


class ReplayLoader:
    """Iterates a loader once, keeps its batches, and replays them on later passes.

    For the validation split, whose transform is deterministic: decoding and resizing the
    same images every epoch is work done once.
    """

    def __init__(self, loader: SkippingLoader):
        self.loader = loader
        self.batches: list | None = None

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def skipped(self) -> int:
        """Images left out at decode on the one pass that read the files."""
        return self.loader.skipped

    def __iter__(self):
        if self.batches is not None:
            yield from self.batches
            return
        batches = []
        for batch in self.loader:
            batches.append(batch)
            yield batch
        self.batches = batches


def replay_bytes(num_images: int, input_size: int) -> int:
    """Memory a ReplayLoader holds for num_images uint8 images."""
    return num_images * 3 * input_size * input_size


def collate(batch: list) -> tuple[torch.Tensor | augment.CropBatch | None, torch.Tensor | None, int]:
    """(images, labels, how many items were skipped); images and labels are None if all were.

    Images are a uint8 tensor, or with data.gpu_augment a CropBatch for the device to render."""
    good = [item for item in batch if item is not None]
    if not good:
        return None, None, len(batch)
    if isinstance(good[0][0], augment.Crop):
        images = augment.collate([crop for crop, _ in good])
        return images, torch.tensor([label for _, label in good]), len(batch) - len(good)
    images, labels = torch.utils.data.default_collate(good)
    return images, labels, len(batch) - len(good)


class SkippingLoader:
    """A DataLoader's batches without the images that did not decode, and without empty batches.

    Yields (images, labels). `skipped` counts the images left out during the latest pass: each
    worker process has its own dataset, so the count travels with the batches.
    """

    def __init__(self, loader: DataLoader):
        self.loader = loader
        self.skipped = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order and augmentations the next pass draws (training only)."""
        if isinstance(self.loader.sampler, EpochShuffle):
            self.loader.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)  # an upper bound when batches are skipped

    def __iter__(self) -> Iterator[tuple[torch.Tensor | augment.CropBatch, torch.Tensor]]:
        self.skipped = 0
        for images, labels, skipped in self.loader:
            self.skipped += skipped
            if images is not None:
                yield images, labels


@dataclass(frozen=True)
class LoaderSettings:
    """How the loaders decode and batch; the same for both splits."""

    input_size: int
    batch_size: int
    num_workers: int
    seed: int
    pin_memory: bool = False
    skip_bad: bool = False
    max_image_pixels: int | None = None
    # A last training batch smaller than this is left out (a different image each epoch, as the
    # order is shuffled): models whose batch norm sees 1x1 maps crash on a batch of one.
    min_train_batch: int = 1
    train_cache_bytes: int = 0  # memory for the decoded training images (decode_once); 0: decode each epoch
    # Training crops only drawn in the workers, rendered on the device (augment.py).
    gpu_augment: bool = False
    # Under torchrun: this process's shard. batch_size is per rank.
    rank: int = 0
    world_size: int = 1


def build_loaders(samples: dict[str, list[Sample]], settings: LoaderSettings) -> dict[str, SkippingLoader]:
    """Shuffled train and ordered val loaders whose workers live for the whole run."""
    tfms = transforms(settings.input_size, settings.gpu_augment)
    workers = settings.num_workers
    # Named explicitly: inside a joblib (loky) worker the process-wide default context is
    # loky's, whose processes DataLoader cannot start.
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else None) if workers else None
    loaders = {}
    rank, world = settings.rank, settings.world_size
    for split in SPLITS:
        train = split == "train"
        seed = settings.seed if train else None
        # Validation shards without the sampler's padding: every image counts once, so accuracy
        # summed over ranks is exactly one process's.
        shard = samples[split] if train else samples[split][rank::world]
        dataset = ImageFiles(shard, tfms[split], settings.skip_bad, settings.max_image_pixels, seed)
        if train and settings.train_cache_bytes:  # before the workers start: they share its memory
            dataset.decoded = decode_once(dataset, settings.input_size, settings.train_cache_bytes, workers)
        sampler = EpochShuffle(len(dataset), settings.seed, rank, world) if train else None
        loaders[split] = SkippingLoader(
            DataLoader(
                dataset,
                batch_size=settings.batch_size,
                sampler=sampler,
                num_workers=workers,
                # Workers start once, not once per epoch and phase as in the tutorial.
                persistent_workers=workers > 0,
                multiprocessing_context=context,
                pin_memory=settings.pin_memory,
                collate_fn=collate,
                generator=torch.Generator().manual_seed(settings.seed),
                drop_last=train and _short_last_batch(len(sampler), settings),
                worker_init_fn=_leave_signals_to_the_main_process,
            )
        )
    return loaders


def close(loaders: dict) -> None:
    """Stop the loaders' persistent workers now, at the end of their run, the way DataLoader does
    when it is collected: a sweep's next job in this process, or the exit of a process that
    multiprocessing started (a joblib job), would otherwise find them still running."""
    for loader in loaders.values():
        while not isinstance(loader, DataLoader):  # ReplayLoader -> SkippingLoader -> DataLoader
            loader = loader.loader
        iterator, loader._iterator = getattr(loader, "_iterator", None), None
        if hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()


def _leave_signals_to_the_main_process(worker_id: int) -> None:
    """Workers ignore Ctrl-C and SIGTERM, which terminals, `timeout` and SLURM send to the whole
    process group: the main process stops the run (KILLED, checkpoint kept) and then its workers.
    A worker killed first would turn that into a DataLoader error."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _stop_workers_left_at_exit() -> None:
    """Kill loader workers still alive when the process exits (a persistent loader held by a
    global, a traceback, a reference cycle the collector has not reached yet, an interactive
    session). multiprocessing's own exit function stops daemonic children with SIGTERM, which
    these workers ignore, and then waits for them for ever."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


# Before multiprocessing's exit function terminates and joins the children: it runs finalizers
# of priority 0 and up first. A process multiprocessing started itself (a joblib/loky sweep job)
# calls that function when its work returns, before any atexit hook; the main interpreter calls
# it from atexit, where this hook, registered after multiprocessing's, runs first anyway.
multiprocessing.util.Finalize(None, _stop_workers_left_at_exit, exitpriority=100)
atexit.register(_stop_workers_left_at_exit)


def _short_last_batch(size: int, settings: LoaderSettings) -> bool:
    """Whether the last training batch is too small for the model (and is then left out)."""
    last = size % settings.batch_size
    if 0 < last < settings.min_train_batch:
        log.info(
            "the last training batch would hold %d image(s), fewer than the model's batch norm needs: "
            "it is left out each epoch (a different image each time, as the order is shuffled)",
            last,
        )
        return True
    return False
