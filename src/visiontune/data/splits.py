"""The splits a run trains, validates and tests on: the given ones kept, the missing ones carved, stratified.

A split is carved from the training pool class by class (stratified), each class's files ordered by
sha256(seed, relative path): the same seed and files give the same split on every machine, in every
process and after a resume, whatever order the file system lists them in, and an added file moves
no other file. torch is not imported here: the CLI checks a layout before it is.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from visiontune import VisiontuneError, is_fraction

log = logging.getLogger(__name__)

Sample = tuple[str, object]  # (path, label): an int, or a tuple of ints for a multi-label image


@dataclass(frozen=True)
class SplitPlan:
    """How the splits not given are made (data.val_fraction, data.test_fraction, data.folds, data.fold)."""

    seed: int
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    folds: int = 0  # k-fold: the training pool divided into this many folds; 0: off
    fold: int = 0  # the fold validated on; the others train


def assign(
    given: dict[str, list[Sample]], plan: SplitPlan, name: Callable[[str], str]
) -> dict[str, list[Sample]]:
    """train, val (and test, where there is one) from the `given` splits: train always, val and test
    where the layout has them. A missing test split is carved from train (test_fraction), then a
    missing val split (val_fraction); with folds, fold `fold` of train is the val split instead.
    `name` turns a sample's path into what orders it (its path relative to the data's root)."""
    splits = dict(given)
    train = splits.pop("train")
    if "test" not in splits and plan.test_fraction > 0:
        train, splits["test"] = carve(train, plan.test_fraction, _salted(plan.seed, "test"), name)
    if plan.folds:
        if "val" in splits:
            log.info(
                "data.folds=%d: fold %d is the val split; the given val split is not used",
                plan.folds,
                plan.fold,
            )
        parts = folds(train, plan.folds, plan.seed, name)
        splits["val"] = parts[plan.fold]
        train = [s for i, part in enumerate(parts) if i != plan.fold for s in part]
    elif "val" not in splits:
        train, splits["val"] = carve(train, plan.val_fraction, _salted(plan.seed, "val"), name)
    order = {"train": train, "val": splits["val"]}
    return order | ({"test": splits["test"]} if "test" in splits else {})


def carve(
    samples: list[Sample], fraction: float, seed: str, name: Callable[[str], str]
) -> tuple[list[Sample], list[Sample]]:
    """(kept, carved): about `fraction` of each class's samples carved (at least one of a class
    with two or more, never its last); both lists in the order `name` sorts them."""
    kept, carved = [], []
    for members in _by_class(samples).values():
        ranked = _ranked(members, seed, name)
        n = len(ranked)
        take = min(max(int(n * fraction + 0.5), 1 if n > 1 else 0), n - 1) if fraction else 0
        carved += ranked[:take]
        kept += ranked[take:]
    return _sorted(kept, name), _sorted(carved, name)


def folds(samples: list[Sample], k: int, seed: int, name: Callable[[str], str]) -> list[list[Sample]]:
    """`samples` dealt into k stratified folds: each class's files, in their seeded order, dealt
    round the folds in turn, continuing where the class before stopped (folds differ by one at most)."""
    parts: list[list[Sample]] = [[] for _ in range(k)]
    dealt = 0
    for members in _by_class(samples).values():
        for sample in _ranked(members, _salted(seed, "folds"), name):
            parts[dealt % k].append(sample)
            dealt += 1
    return [_sorted(part, name) for part in parts]


def _by_class(samples: list[Sample]) -> dict[str, list[Sample]]:
    """Samples grouped by their label (a multi-label image by its whole label set), groups in label order."""
    groups: dict[str, list[Sample]] = {}
    for sample in samples:
        groups.setdefault(repr(sample[1]), []).append(sample)
    return dict(sorted(groups.items()))


def _ranked(members: list[Sample], seed: str, name: Callable[[str], str]) -> list[Sample]:
    return sorted(members, key=lambda s: hashlib.sha256(f"{seed}\t{name(s[0])}".encode()).hexdigest())


def _sorted(samples: list[Sample], name: Callable[[str], str]) -> list[Sample]:
    return sorted(samples, key=lambda s: name(s[0]))


def _salted(seed: int, what: str) -> str:
    return f"{seed}/{what}"


def check_plan(val_fraction, test_fraction, folds, fold) -> None:
    """The split keys' values, each a usable number; one line naming the key otherwise."""
    for key, value in (("data.val_fraction", val_fraction), ("data.test_fraction", test_fraction)):
        if not is_fraction(value):
            raise VisiontuneError(
                f"{key}={value} must be a fraction from 0 up to (not including) 1, e.g. {key}=0.2"
            )
    if val_fraction + test_fraction >= 1:
        raise VisiontuneError(
            f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} leave no images to "
            f"train on: together they must stay below 1"
        )
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 0 or folds == 1:
        raise VisiontuneError(
            f"data.folds={folds} must be 0 (off) or a whole number of folds, 2 or more, e.g. 5"
        )
    if folds and (isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < folds):
        raise VisiontuneError(
            f"data.fold={fold} must be a fold number from 0 to {folds - 1} (data.folds={folds})"
        )
