"""Where a run's samples come from, decided once: a folder of images (split folders or one folder of
class folders) or CSV tables; then the splits it lacks carved (splits.py) and its images checked.

torch is not imported here: the CLI checks a source (check_source) before it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from visiontune.data import folders, table
from visiontune.data.splits import SplitPlan

if TYPE_CHECKING:
    from visiontune.config import DataSettings, TableSettings


def plan_of(settings: DataSettings, seed: int) -> SplitPlan:
    """How the splits a layout lacks are carved: seeded by data.split_seed, else the run's seed."""
    seed = seed if settings.split_seed is None else settings.split_seed
    return SplitPlan(seed, settings.val_fraction, settings.test_fraction, settings.folds, settings.fold)


def check_source(settings: DataSettings, launch_dir: Path) -> None:
    """Cheaply, before a run exists: a folder's layout (no image opened), or every CSV row."""
    if settings.tables is None:
        folders.check_layout((launch_dir / settings.root).resolve(), downloads=bool(settings.url))
    else:
        read_tables(settings.tables, launch_dir)


def read_tables(tables: TableSettings, launch_dir: Path) -> tuple[Path, list[str], dict[str, list]]:
    """(image root, classes, the splits the CSVs give) of data=csv."""
    files = {"train": tables.train_csv, "val": tables.val_csv, "test": tables.test_csv}
    paths = {split: (launch_dir / name).resolve() for split, name in files.items() if name is not None}
    image_root = (launch_dir / tables.image_root).resolve()
    columns = table.Columns(tables.path_column, tables.label_column, tables.label_delim)
    classes, given = table.read_tables(paths, image_root, columns)
    if len(classes) < 2:
        raise folders.VisiontuneError(
            f"{paths['train']} has one label, {classes[0]!r}: a classifier needs at least two."
        )
    return image_root, classes, given


def check_data(settings: DataSettings, launch_dir: Path, seed: int) -> folders.CheckedData:
    """The run's samples, split and checked (each image's header read once). A folder must exist
    (pipeline downloads one from data.url first)."""
    unreadable = (settings.skip_bad_images, settings.max_image_pixels)
    plan = plan_of(settings, seed)
    if settings.tables is None:
        root = (launch_dir / settings.root).resolve()
        classes, given = folders.find_samples(root)
        return folders.check_samples(root, classes, given, plan, unreadable)
    root, classes, given = read_tables(settings.tables, launch_dir)
    multilabel = settings.tables.label_delim is not None
    return folders.check_samples(root, classes, given, plan, unreadable, multilabel)
