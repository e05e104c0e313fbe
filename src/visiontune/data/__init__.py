"""Image folders to batches, in the order the data flows: folders -> images -> loaders.

folders.py  where the samples come from: download and verify, the layout, each image's header
images.py   one file to one model input: guarded decode, the transforms, normalisation
loaders.py  samples to batches across epochs: datasets, order, caches, worker processes

The names callers use are here too (`data.build_loaders`, `data.decode`, ...), as before the split.
"""

from visiontune.data.folders import (
    SPLITS,
    CheckedData,
    Sample,
    check_folder,
    class_folders,
    download,
    drop_unreadable,
    find_samples,
    image_files,
    prepare_root,
    tree_digest,
)
from visiontune.data.images import (
    DECODED_SIDE_FACTOR,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Normalizer,
    TooManyPixels,
    decode,
    header_problem,
    transforms,
)
from visiontune.data.loaders import (
    PROJECT_AFTER,
    EpochShuffle,
    ImageFiles,
    LoaderSettings,
    ReplayLoader,
    SkippingLoader,
    build_loaders,
    close,
    collate,
    decode_once,
    replay_bytes,
)

__all__ = [
    "DECODED_SIDE_FACTOR",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PROJECT_AFTER",
    "SPLITS",
    "CheckedData",
    "EpochShuffle",
    "ImageFiles",
    "LoaderSettings",
    "Normalizer",
    "ReplayLoader",
    "Sample",
    "SkippingLoader",
    "TooManyPixels",
    "build_loaders",
    "check_folder",
    "class_folders",
    "close",
    "collate",
    "decode",
    "decode_once",
    "download",
    "drop_unreadable",
    "find_samples",
    "header_problem",
    "image_files",
    "prepare_root",
    "replay_bytes",
    "transforms",
    "tree_digest",
]
