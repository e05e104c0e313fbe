"""Where the samples come from: the data folder downloaded and verified, its layout and images checked.

torch is not imported here at load time: the CLI checks a folder's layout (check_layout) before it is.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from visiontune import VisiontuneError
from visiontune.data import splits
from visiontune.data.splits import SplitPlan

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
TEST = "test"  # an optional third split folder beside train/ and val/, scored once with the best weights

# torchvision.datasets.folder.IMG_EXTENSIONS, written out so that the layout check needs no torch
# (tests/test_data_folders.py checks that they stay the same).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# Names a message lists before it says "and N more": 100,000 empty class folders stay one short line.
LISTED = 10

Sample = tuple[str, int]


def prepare_root(root: Path, url: str | None, md5: str | None, tree_sha256: str | None) -> Path:
    """The data folder, downloaded from `url` first if it is missing and a URL is known."""
    if root.exists():
        return root
    if not url:
        raise _missing_root(root)
    download(url, root, md5, tree_sha256)
    return root


def _missing_root(root: Path) -> VisiontuneError:
    return VisiontuneError(
        f"data.root={root} does not exist. Point data.root at a folder holding train/ and val/ "
        f"class folders (data.root=/path/to/images)."
    )


def check_layout(root: Path, downloads: bool) -> None:
    """The layout alone, cheaply (no image is opened): what the CLI checks before a run exists.

    `root` exists (unless it `downloads` from data.url), its split folders (train/ and val/, a
    test/ where there is one; or root itself, one folder of class folders) hold class folders, at
    least two, and some of them hold image files. check_folder checks the rest in the run.
    """
    if not root.exists():
        if downloads:
            return
        raise _missing_root(root)
    for split in split_folders(root):
        classes = class_folders(root, split)
        _check_class_count(root, classes)
        if not any(_has_image(root / split / name) for name in classes):
            raise _no_images(root / split, classes)


def split_folders(root: Path) -> list[str]:
    """The split folders under root: train and val (and test, where it is there), or [""] where
    root has neither train/ nor val/: one folder of class folders, split by the run (splits.py)."""
    if not (root / "train").is_dir() and not (root / "val").is_dir():
        return [""]
    return [*SPLITS, TEST] if (root / TEST).is_dir() else list(SPLITS)


def _has_image(folder: Path) -> bool:
    return next(iter(_image_paths(folder)), None) is not None


def _check_class_count(root: Path, classes: list[str]) -> None:
    if len(classes) == 1:
        raise VisiontuneError(
            f"{root} holds one class, {classes[0]!r} (in {root / 'train'}): a classifier needs at least "
            f"two. Add a folder per class to train/ and val/, or point data.root at another folder."
        )


def _no_images(folder: Path, classes: list[str]) -> VisiontuneError:
    return VisiontuneError(
        f"{folder} has class folders [{few(classes)}] but no images in them "
        f"(extensions {', '.join(IMG_EXTENSIONS)}): put each class's images in {folder}/<class>/."
    )


def few(names: list[str]) -> str:
    """The first LISTED names quoted, and how many more: a list a one-line message can hold."""
    shown = ", ".join(repr(name) for name in names[:LISTED])
    return shown if len(names) <= LISTED else f"{shown} and {len(names) - LISTED:,} more"


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


@dataclass(frozen=True)
class CheckedData:
    """A folder that passed the checks: its classes and the readable samples of each split."""

    root: Path  # what sample paths are relative to: the image folder, or data.image_root
    classes: list[str]
    samples: dict[str, list[Sample]]  # train, val, and test where the run has a test split
    skipped: int  # unreadable images left out up front (with skip_bad)
    multilabel: bool = False  # labels are tuples of class indices (a CSV with data.label_delim)


def check_folder(
    root: Path, skip_bad: bool, max_image_pixels: int | None = None, plan: SplitPlan | None = None
) -> CheckedData:
    """The layout checked, the splits it lacks carved by `plan`, each image's header read once,
    and every class left with images."""
    classes, given = find_samples(root)
    return check_samples(root, classes, given, plan or SplitPlan(seed=0), (skip_bad, max_image_pixels))


def check_samples(
    root: Path,
    classes: list[str],
    given: dict[str, list],
    plan: SplitPlan,
    unreadable: tuple,
    multilabel=False,
) -> CheckedData:
    """The given splits completed by `plan` (carved before any image is opened: the split depends
    on the files listed, not on which of them decode), then each header read once; `unreadable`:
    (skip_bad, max_image_pixels)."""
    samples = splits.assign(given, plan, lambda path: Path(os.path.relpath(path, root)).as_posix())
    skipped = 0
    for split in samples:
        samples[split], bad = drop_unreadable(samples[split], *unreadable)
        skipped += bad
    # After dropping: a class whose every image was unreadable is as empty as an empty folder.
    _check_class_counts(root, classes, samples, multilabel)
    return CheckedData(root, classes, samples, skipped, multilabel)


def find_samples(root: Path) -> tuple[list[str], dict[str, list[Sample]]]:
    """Class names and (path, label) samples of each split folder (train alone for one folder of
    class folders), after checking the layout."""
    names = split_folders(root)
    split_classes = {split: class_folders(root, split) for split in names}
    for split in names[1:]:
        if split_classes[split] != split_classes["train"]:
            _different_classes(root, split_classes["train"], split_classes[split], split)
    classes = split_classes[names[0]]
    _check_class_count(root, classes)
    samples = {}
    for split in names:
        samples[split or "train"] = [
            (str(path), label)
            for label, name in enumerate(classes)
            for path in image_files(root / split / name)
        ]
        if not samples[split or "train"]:
            raise _no_images(root / split, classes)
    return classes, samples


def _different_classes(root: Path, train: list[str], other: list[str], split: str) -> None:
    only_train = sorted(set(train) - set(other))
    only_other = sorted(set(other) - set(train))
    raise VisiontuneError(
        f"train/ and {split}/ under {root} have different class folders: only in train "
        f"[{few(only_train)}], only in {split} [{few(only_other)}]. The splits need the same class folders."
    )


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
    return sorted(_image_paths(folder))


def _image_paths(folder: Path):
    return (
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in IMG_EXTENSIONS
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
        and path.is_file()
    )


def _check_class_counts(
    root: Path, classes: list[str], samples: dict[str, list[Sample]], multilabel=False
) -> None:
    """Refuse a class with no training images; warn about one that cannot be validated."""
    empty = {split: _classes_without_samples(classes, samples[split], multilabel) for split in SPLITS}
    if empty["train"]:
        where = root / "train" if (root / "train").is_dir() else root
        raise VisiontuneError(
            f"class folder(s) [{few(empty['train'])}] in {where} have no readable images: a class "
            f"needs training images. Add images of it, or remove it from the data."
        )
    if not samples["val"]:
        raise VisiontuneError(
            f"the val split under {root} has no readable images: put some in its class folders "
            f"(or raise data.val_fraction)."
        )
    if empty["val"]:
        log.warning(
            "class folder(s) [%s] in %s have no readable images: they train but are never validated",
            few(empty["val"]),
            root / "val" if (root / "val").is_dir() else f"the val split of {root}",
        )


def _classes_without_samples(classes: list[str], samples: list[Sample], multilabel=False) -> list[str]:
    labels = {x for _, label in samples for x in label} if multilabel else {label for _, label in samples}
    return [name for label, name in enumerate(classes) if label not in labels]


def drop_unreadable(
    samples: list[Sample], skip: bool, max_image_pixels: int | None = None
) -> tuple[list[Sample], int]:
    """Check each image's header once; fail on the first bad file, or leave bad ones out."""
    from visiontune.data.images import TooManyPixels, header_problem  # torch: not before the run

    good, bad = [], []
    for sample in samples:
        if (problem := header_problem(sample[0], max_image_pixels)) is None:
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
