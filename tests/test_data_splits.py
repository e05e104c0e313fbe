"""data/splits.py and data/sources.py: one folder split for the run, a test split, k-fold selection,
seeded and stratified, the same in any listing order, process and hash seed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from helpers import compose_cfg, make_image_folder
from visiontune import VisiontuneError, config, data
from visiontune.data import folders, splits


@pytest.fixture(scope="module")
def one_folder(tmp_path_factory) -> Path:
    """root/<class>/*.jpg, no split folders: 10 ants, 10 bees."""
    return make_image_folder(tmp_path_factory.mktemp("one"), {"all": 10}) / "all"


def test_one_folder_is_split_stratified_and_seeded(one_folder):
    checked = data.check_folder(
        one_folder, False, plan=data.SplitPlan(seed=7, val_fraction=0.2, test_fraction=0.1)
    )
    counts = {split: Counter(label for _, label in samples) for split, samples in checked.samples.items()}
    assert counts == {"train": {0: 7, 1: 7}, "val": {0: 2, 1: 2}, "test": {0: 1, 1: 1}}
    every = [path for samples in checked.samples.values() for path, _ in samples]
    assert len(every) == len(set(every)) == 20  # disjoint, and nothing left out
    again = data.check_folder(
        one_folder, False, plan=data.SplitPlan(seed=7, val_fraction=0.2, test_fraction=0.1)
    )
    assert again.samples == checked.samples  # the same seed: the same split (a resume computes it anew)
    other = data.check_folder(
        one_folder, False, plan=data.SplitPlan(seed=8, val_fraction=0.2, test_fraction=0.1)
    )
    assert other.samples["val"] != checked.samples["val"]


def test_the_split_does_not_depend_on_listing_order(one_folder):
    _, given = folders.find_samples(one_folder)
    plan = data.SplitPlan(seed=3)
    name = lambda path: Path(path).relative_to(one_folder).as_posix()  # noqa: E731
    forward = splits.assign({"train": given["train"]}, plan, name)
    backward = splits.assign({"train": list(reversed(given["train"]))}, plan, name)
    assert forward == backward


SPLIT_IN_A_PROCESS = """
import json, sys
from pathlib import Path
from visiontune.data import folders, splits
root = Path(sys.argv[1])
_, given = folders.find_samples(root)
parts = splits.assign(given, splits.SplitPlan(seed=5), lambda p: Path(p).relative_to(root).as_posix())
print(json.dumps({k: [Path(p).relative_to(root).as_posix() for p, _ in v] for k, v in parts.items()}))
"""


def test_the_split_is_the_same_in_other_processes_and_hash_seeds(one_folder, tmp_path):
    """Another process (another hash seed), and the folder copied elsewhere: the same files in each split."""
    import shutil

    copy = shutil.copytree(one_folder, tmp_path / "elsewhere")
    answers = []
    for root, hash_seed in ((one_folder, "1"), (copy, "2")):
        env = os.environ | {"PYTHONHASHSEED": hash_seed}
        done = subprocess.run(
            [sys.executable, "-c", SPLIT_IN_A_PROCESS, str(root)],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        answers.append(json.loads(done.stdout))
    assert answers[0] == answers[1]
    assert len(answers[0]["val"]) == 4 and "torch" not in SPLIT_IN_A_PROCESS


def test_a_test_folder_beside_train_and_val_is_the_test_split(tmp_path):
    root = make_image_folder(tmp_path / "d", {"train": 3, "val": 2, "test": 2})
    checked = data.check_folder(root, False)
    assert {split: len(s) for split, s in checked.samples.items()} == {"train": 6, "val": 4, "test": 4}
    assert all("/test/" in path for path, _ in checked.samples["test"])


def test_folds_are_stratified_disjoint_and_cover_the_training_split(one_folder):
    name = lambda path: Path(path).relative_to(one_folder).as_posix()  # noqa: E731
    _, given = folders.find_samples(one_folder)
    parts = splits.folds(given["train"], 5, seed=1, name=name)
    assert [Counter(label for _, label in part) for part in parts] == [{0: 2, 1: 2}] * 5
    assert sorted(s for part in parts for s in part) == sorted(given["train"])
    chosen = data.check_folder(one_folder, False, plan=data.SplitPlan(seed=1, folds=5, fold=3))
    assert chosen.samples["val"] == parts[3]
    assert sorted(chosen.samples["train"]) == sorted(s for i, p in enumerate(parts) if i != 3 for s in p)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.val_fraction=1.5", "data.val_fraction=1.5 must be a fraction"),
        ("data.test_fraction=-0.1", "data.test_fraction=-0.1 must be a fraction"),
        ("data.folds=1", "data.folds=1 must be 0 .off. or a whole number of folds, 2 or more"),
        ("data.sampler=weighted", "data.sampler=weighted must be shuffle"),
        ("loss.class_weights=inverse", "loss.class_weights=inverse must be null"),
    ],
)
def test_split_and_imbalance_keys_are_checked(override, message):
    with pytest.raises(VisiontuneError, match=message):
        config.read(compose_cfg("data=imagefolder", "data.root=x", override))


def test_a_fold_outside_the_folds_is_refused():
    with pytest.raises(VisiontuneError, match="data.fold=5 must be a fold number from 0 to 2"):
        config.read(compose_cfg("data=imagefolder", "data.root=x", "data.folds=3", "data.fold=5"))


def test_one_folder_layout_passes_the_cheap_check_and_one_class_is_refused(one_folder, tmp_path):
    data.check_layout(one_folder, downloads=False)
    lonely = make_image_folder(tmp_path / "l", {"all": 2}, classes=("ants",)) / "all"
    with pytest.raises(VisiontuneError, match="one class, 'ants'"):
        data.check_layout(lonely, downloads=False)


def test_split_seed_holds_the_split_across_run_seeds(one_folder, tmp_path):
    from visiontune.data import sources

    val = {}
    for seed in (1, 2):
        settings = config.read(
            compose_cfg("data=imagefolder", f"data.root={one_folder}", "data.split_seed=9")
        ).data
        val[seed] = data.check_data(settings, tmp_path, seed=seed).samples["val"]
        assert sources.plan_of(settings, seed).seed == 9
    assert val[1] == val[2]
