"""What a sweep's jobs in one process share: decoded images and frozen-backbone outputs, within data.cache_mb.

Hydra's basic launcher runs a sweep's jobs one after the other in one process, and each joblib
worker runs its share of them likewise: the second job on the same files would decode the same
images again, and a second feature extraction with the same backbone would run it over the same
val split again. Each cache a run keeps between epochs is also offered here, under a key naming
everything its contents depend on (the files by path, size, modification time and inode; the
decode size; for backbone outputs the stem's code and weights, precision and device), and a later
job that builds the same key takes the very tensors the earlier one made: its results are bit for
bit those of a fresh process. A different input size, data set or weight file builds another key.

What is held stays within the latest job's data.cache_mb: the least recently used entries go first,
so a job's own entries (taken or added during its set-up and first epoch) stay; a job about to
decode its training images anew first lets go of enough older entries for them to fit beside.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Iterable

log = logging.getLogger(__name__)

_held: OrderedDict[str, tuple[object, int]] = OrderedDict()  # key -> (value, bytes), oldest use first
_budget = 0


def set_budget(max_bytes: int) -> None:
    """The budget of the job starting now (its data.cache_mb): older entries beyond it are let go."""
    global _budget
    _budget = max_bytes
    _fit(0)


def get(key: str | None):
    """The value held under `key` (now the most recently used), or None."""
    if key is None or key not in _held:
        return None
    _held.move_to_end(key)
    return _held[key][0]


def put(key: str | None, value: object, nbytes: int) -> None:
    """Hold `value` (`nbytes` of tensors) for later jobs, where it fits the budget."""
    if key is None or nbytes > _budget:
        return
    _held.pop(key, None)
    _fit(nbytes)
    _held[key] = (value, nbytes)


def make_room(nbytes: int) -> None:
    """Before a job builds a cache of up to `nbytes`: the least recently used entries go until it
    would fit beside them, so that earlier jobs' entries and the new cache never pass the budget."""
    _fit(nbytes)


def held_bytes() -> int:
    return sum(nbytes for _, nbytes in _held.values())


def clear() -> None:
    """Let go of everything: the next job computes its caches afresh."""
    _held.clear()


def _fit(incoming: int) -> None:
    while _held and held_bytes() + incoming > _budget:
        _held.popitem(last=False)


def key(*parts: object) -> str:
    """A key from the values a cache's contents depend on (their reprs)."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def files_identity(samples: Iterable[tuple[str, int]]) -> str:
    """The samples in order, each file by path, size, modification time and inode, with its label:
    a file replaced or touched between two jobs gives another identity."""
    digest = hashlib.sha256()
    for path, label in samples:
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ino}\0{label}\n".encode())
    return digest.hexdigest()


def tensors_digest(tensors: Iterable) -> str:
    """sha256 of tensors' dtypes, shapes and bytes (a module's weights, say)."""
    import torch

    digest = hashlib.sha256()
    for tensor in tensors:
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{flat.dtype}{tuple(tensor.shape)}".encode())
        digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return digest.hexdigest()
