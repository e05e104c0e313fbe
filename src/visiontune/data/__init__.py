"""Image folders to batches, in the order the data flows: folders -> images -> loaders.

sources.py  a folder of images or CSV tables, decided once; the run's splits checked
folders.py  where the samples come from: download and verify, the layout, each image's header
table.py    labels from CSV files, each row checked
splits.py   the splits a layout lacks, carved seeded and stratified; k-fold selection
images.py   one file to one model input: guarded decode, the transforms, normalisation
loaders.py  samples to batches across epochs: datasets, order, caches, worker processes

The names callers use are here too (`data.build_loaders`, `data.decode`, ...), as before the split.
They are imported on first use: the CLI checks a folder's layout through folders.py before
torch is imported (images.py and loaders.py import it), and a mistake is answered at once.
"""

import importlib

_MODULE_OF = {
    "folders": (
        "IMG_EXTENSIONS",
        "SPLITS",
        "CheckedData",
        "Sample",
        "check_folder",
        "check_samples",
        "check_layout",
        "class_folders",
        "download",
        "drop_unreadable",
        "find_samples",
        "image_files",
        "prepare_root",
        "tree_digest",
    ),
    "sources": ("check_data", "check_source", "plan_of"),
    "splits": ("SplitPlan",),
    "images": (
        "DECODED_SIDE_FACTOR",
        "IMAGENET_MEAN",
        "IMAGENET_STD",
        "Normalizer",
        "TooManyPixels",
        "decode",
        "header_problem",
        "transforms",
    ),
    "loaders": (
        "PROJECT_AFTER",
        "BalancedDraw",
        "EpochShuffle",
        "ImageFiles",
        "LoaderSettings",
        "ReplayLoader",
        "SkippingLoader",
        "build_loaders",
        "close",
        "collate",
        "decode_once",
        "replay_bytes",
    ),
}
_WHERE = {name: module for module, names in _MODULE_OF.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
