"""Samples to batches, epoch after epoch: datasets, seeded order, decode-once and replay caches, workers."""

from __future__ import annotations

import atexit
import functools
import logging
import multiprocessing
import multiprocessing.util
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from visiontune import VisiontuneError, augment, sharing
from visiontune.config import AugmentSettings
from visiontune.data.folders import Sample
from visiontune.data.images import DECODED_SIDE_FACTOR, TooManyPixels, decode, transforms

log = logging.getLogger(__name__)


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
        # A multi-label dataset's labels are tuples of class indices, handed out as multi-hot rows.
        self.num_labels = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        epoch, index = divmod(index, len(self.samples))
        path, label = self.samples[index]
        if self.num_labels:
            label = multi_hot(label, self.num_labels)
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


def multi_hot(labels: Sequence[int], num_labels: int) -> torch.Tensor:
    """A multi-label image's class indices as a float row of 0s and 1s (BCE's targets)."""
    row = torch.zeros(num_labels)
    row[list(labels)] = 1.0
    return row


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


def decoded_images(dataset: ImageFiles, input_size: int, max_bytes: int, threads: int) -> list | None:
    """decode_once, or the list an earlier job of this process decoded from the same files at the
    same size (sharing.py): the very tensors a fresh decode would give."""
    cap = DECODED_SIDE_FACTOR * input_size
    files = sharing.files_identity(dataset.samples)
    key = sharing.key("decoded", files, cap, dataset.skip_bad, dataset.max_image_pixels)
    decoded = sharing.get(key)
    if decoded is not None and _nbytes(decoded) <= max_bytes:
        log.info(
            "training images decoded once: %d MiB, shared with an earlier job", _nbytes(decoded) // 2**20
        )
        return decoded
    sharing.make_room(max_bytes)
    decoded = decode_once(dataset, input_size, max_bytes, threads)
    if decoded is not None:
        sharing.put(key, decoded, _nbytes(decoded))
    return decoded


def _nbytes(tensors: list) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


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

    def order(self) -> torch.Tensor:
        """This epoch's order of the indices, before sharding."""
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(_mix(self.seed, self.epoch)))

    def __iter__(self) -> Iterator[int]:
        order = self.order()
        padded = order.repeat(-(-len(self) * self.world // self.size))[: len(self) * self.world]
        return iter((padded[self.rank :: self.world] + self.epoch * self.size).tolist())


class BalancedDraw(EpochShuffle):
    """data.sampler=balanced: an epoch of as many draws as images, with replacement, each class
    equally likely (an image's weight is 1 / its class's count). Drawn from (seed, epoch) alone and
    sharded over ranks as EpochShuffle is: the same draws after a resume and under torchrun."""

    def __init__(self, labels: Sequence[int], seed: int, rank: int = 0, world: int = 1):
        super().__init__(len(labels), seed, rank, world)
        counts = torch.bincount(torch.as_tensor(labels))
        self.weights = 1.0 / counts[torch.as_tensor(labels)].double()

    def order(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
        return torch.multinomial(self.weights, self.size, replacement=True, generator=generator)


class ReplayLoader:
    """Iterates a loader once, keeps its batches, and replays them on later passes.

    For the validation split, whose transform is deterministic: decoding and resizing the
    same images every epoch is work done once, and once per process where a sweep's jobs read
    the same split (the loader's `identity`, sharing.py).
    """

    def __init__(self, loader: SkippingLoader):
        self.loader = loader
        self.identity = getattr(loader, "identity", None)
        self.batches: list | None = None
        self._skipped: int | None = None  # with batches an earlier job read
        shared = sharing.get(self.identity)
        if shared is not None:
            self.batches, self._skipped = shared

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def skipped(self) -> int:
        """Images left out at decode on the one pass that read the files."""
        return self.loader.skipped if self._skipped is None else self._skipped

    def __iter__(self):
        if self.batches is not None:
            yield from self.batches
            return
        batches = []
        for batch in self.loader:
            batches.append(batch)
            yield batch
        self.batches = batches
        sharing.put(self.identity, (batches, self.loader.skipped), _nbytes([images for images, _ in batches]))


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

    def __init__(self, loader: DataLoader, identity: str | None = None):
        self.loader = loader
        self.skipped = 0
        # What its batches depend on (the files, the transform's size, the batch size), for
        # caches shared between a sweep's jobs (sharing.py); None: the batches are random.
        self.identity = identity

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
    # The policy and random erasing after crop and flip (the augment group); None: the tutorial's.
    augment: AugmentSettings | None = None
    # Under torchrun: this process's shard. batch_size is per rank.
    rank: int = 0
    world_size: int = 1
    sampler: str = "shuffle"  # balanced: each class drawn equally often (BalancedDraw)
    num_labels: int = 0  # a multi-label run's class count (targets are multi-hot rows); 0: single-label


def build_loaders(samples: dict[str, list[Sample]], settings: LoaderSettings) -> dict[str, SkippingLoader]:
    """Shuffled train and ordered val loaders whose workers live for the whole run."""
    tfms = transforms(settings.input_size, settings.gpu_augment, settings.augment)
    workers = settings.num_workers
    # Named explicitly: inside a joblib (loky) worker the process-wide default context is
    # loky's, whose processes DataLoader cannot start.
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else None) if workers else None
    if workers:
        _stop_workers_at_exit()  # they ignore SIGTERM, which multiprocessing's exit function sends
    loaders = {}
    rank, world = settings.rank, settings.world_size
    for split in samples:  # train, val, and test where there is one (ordered and sharded as val)
        train = split == "train"
        # Validation shards without the sampler's padding: every image counts once, so accuracy
        # summed over ranks is exactly one process's.
        shard = samples[split] if train else samples[split][rank::world]
        dataset = _dataset(shard, tfms["train" if train else "val"], settings, train)
        sampler = _sampler(shard, settings) if train else None
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
            ),
            identity=None if train else _val_identity(shard, settings),
        )
    return loaders


def _dataset(shard: list[Sample], tfm, settings: LoaderSettings, train: bool) -> ImageFiles:
    seed = settings.seed if train else None
    dataset = ImageFiles(shard, tfm, settings.skip_bad, settings.max_image_pixels, seed)
    dataset.num_labels = settings.num_labels
    if train and settings.train_cache_bytes:  # before the workers start: they share its memory
        workers = settings.num_workers
        dataset.decoded = decoded_images(dataset, settings.input_size, settings.train_cache_bytes, workers)
    return dataset


def _sampler(samples: list[Sample], settings: LoaderSettings) -> EpochShuffle:
    if settings.sampler == "balanced":
        return BalancedDraw(
            [label for _, label in samples], settings.seed, settings.rank, settings.world_size
        )
    return EpochShuffle(len(samples), settings.seed, settings.rank, settings.world_size)


def _val_identity(shard: list[Sample], settings: LoaderSettings) -> str:
    """What the val loader's batches depend on: they are the same in any job that builds this."""
    files = sharing.files_identity(shard)
    return sharing.key(
        "val", files, settings.input_size, settings.batch_size, settings.skip_bad, settings.max_image_pixels
    )


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


@functools.cache  # once per process
def _stop_workers_at_exit() -> None:
    """Register _stop_workers_left_at_exit, when the first loader with workers is built: a process
    that only imports visiontune (inference, a sweep's parent) keeps multiprocessing's own exit."""
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
