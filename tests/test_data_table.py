"""data/table.py: labels from CSV files, single- and multi-label; a bad row is one line naming it."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import compose_cfg, make_image_folder
from visiontune import VisiontuneError, config, data
from visiontune.data import sources


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("csv"), {"img": 6})


def _csv(path: Path, rows: list[str], header: str = "path,label") -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def _settings(images: Path, *overrides: str) -> config.DataSettings:
    return config.read(compose_cfg("data=csv", f"data.image_root={images}", *overrides)).data


def test_single_label_csv_without_val_csv_is_split_for_the_run(images, tmp_path):
    rows = [f"img/{c}/{c}_{i}.jpg,{c}" for c in ("ants", "bees") for i in range(6)]
    table = _csv(tmp_path / "train.csv", rows)
    checked = data.check_data(_settings(images, f"data.train_csv={table}"), tmp_path, seed=1)
    assert checked.classes == ["ants", "bees"] and not checked.multilabel
    assert {split: len(s) for split, s in checked.samples.items()} == {"train": 10, "val": 2}
    assert all(Path(path).parent.name == checked.classes[label] for path, label in checked.samples["train"])


def test_multi_label_csv_with_named_columns_and_a_val_csv(images, tmp_path):
    rows = [f"img/ants/ants_{i}.jpg,ants|{'red' if i % 2 else 'dark'}" for i in range(6)]
    rows += [f"img/bees/bees_{i}.jpg,bees|red" for i in range(6)]
    train = _csv(tmp_path / "train.csv", rows[:4] + rows[6:10], header="file,tags")
    val = _csv(tmp_path / "val.csv", rows[4:6] + rows[10:], header="file,tags")
    columns = ("data.path_column=file", "data.label_column=tags", 'data.label_delim="|"')
    settings = _settings(images, f"data.train_csv={train}", f"data.val_csv={val}", *columns)
    checked = data.check_data(settings, tmp_path, seed=1)
    assert checked.multilabel and checked.classes == ["ants", "bees", "dark", "red"]
    assert {split: len(s) for split, s in checked.samples.items()} == {"train": 8, "val": 4}
    assert {label for _, label in checked.samples["train"]} == {(0, 2), (0, 3), (1, 3)}


BAD = {
    "missing image": (
        "img/ants/ants_0.jpg,ants\nimg/ants/nope.jpg,ants",
        r"train.csv row 3: image .*nope.jpg does not exist",
    ),
    "empty label": (
        "img/ants/ants_0.jpg,ants\nimg/bees/bees_0.jpg,",
        r"train.csv row 3: empty label for img/bees/bees_0.jpg",
    ),
    "unknown column": (
        "img/ants/ants_0.jpg",
        r"train.csv: no column 'label' \(data.label_column\); its columns are 'path'",
    ),
}


@pytest.mark.parametrize("kind", BAD)
def test_a_bad_csv_is_one_line_naming_the_row_before_any_run(images, tmp_path, kind):
    body, message = BAD[kind]
    header = "path" if kind == "unknown column" else "path,label"
    table = tmp_path / "train.csv"
    table.write_text(f"{header}\n{body}\n")
    with pytest.raises(VisiontuneError, match=message) as raised:
        sources.check_source(_settings(images, f"data.train_csv={table}"), tmp_path)  # what the CLI runs
    assert "\n" not in str(raised.value)


def test_a_val_label_the_training_csv_lacks_is_refused(images, tmp_path):
    train = _csv(tmp_path / "train.csv", ["img/ants/ants_0.jpg,ants", "img/bees/bees_0.jpg,bees"])
    val = _csv(tmp_path / "val.csv", ["img/ants/ants_1.jpg,wasps"])
    with pytest.raises(VisiontuneError, match=r"val.csv row 2: label 'wasps' is not in the training table"):
        sources.check_source(_settings(images, f"data.train_csv={train}", f"data.val_csv={val}"), tmp_path)


def test_data_csv_needs_its_training_csv():
    with pytest.raises(VisiontuneError, match="data.train_csv is required for data=csv"):
        config.read(compose_cfg("data=csv"))
