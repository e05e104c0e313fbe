"""visiontune-compare by experiment, by parent and by run ids, on a store from a real sweep."""

from __future__ import annotations

import csv

import pytest
from PIL import Image

from helpers import run_cli


@pytest.fixture(scope="module")
def swept(tiny_sweep):
    return tiny_sweep.cwd, tiny_sweep.parent, list(tiny_sweep.children.values())


def compare(cwd, *args):
    return run_cli(cwd, *args, module="visiontune.commands.compare")


def read_report(out):
    with open(out / "leaderboard.csv") as f:
        rows = list(csv.DictReader(f))
    with Image.open(out / "val_acc_overlay.png") as image:
        assert image.size[0] > 300 and image.size[1] > 200
    assert (out / "leaderboard.md").read_text().startswith("| run |")
    return rows


@pytest.mark.parametrize("how", ["experiment", "parent", "run-ids"])
def test_compare_writes_the_sweeps_table_and_figure(swept, how, tmp_path):
    cwd, parent, children = swept
    selector = {
        "experiment": ["--experiment", "visiontune"],
        "parent": ["--parent", parent.info.run_id],
        "run-ids": ["--run-ids", *[c.info.run_id for c in children]],
    }[how]
    result = compare(cwd, *selector, "--out", str(tmp_path / "report"))
    assert result.returncode == 0, result.stderr
    rows = read_report(tmp_path / "report")
    assert {r["run_id"] for r in rows} == {c.info.run_id for c in children}
    ranked = sorted(children, key=lambda c: (-c.data.metrics["best_val_acc"], c.info.run_name))
    assert [r["run_id"] for r in rows] == [c.info.run_id for c in ranked], "best first"
    for row, child in zip(rows, ranked, strict=True):
        assert float(row["best_val_acc"]) == child.data.metrics["best_val_acc"]
        assert row["trainable_params"] == child.data.params["trainable_params"]
        assert float(row["train_seconds"]) > 0 and row["status"] == "FINISHED"


def test_compare_on_the_parent_matches_the_sweep_summary(swept, tmp_path):
    from mlflow.tracking import MlflowClient

    cwd, parent, _ = swept
    result = compare(cwd, "--parent", parent.info.run_id, "--out", str(tmp_path / "r"))
    assert result.returncode == 0, result.stderr
    client = MlflowClient(f"sqlite:///{cwd / 'outputs' / 'mlflow.db'}")
    logged = client.download_artifacts(parent.info.run_id, "leaderboard.csv")
    with open(logged) as f:
        assert list(csv.DictReader(f)) == read_report(tmp_path / "r")


def test_compare_unknown_experiment_fails_clearly(swept, tmp_path):
    result = compare(swept[0], "--experiment", "nope", "--out", str(tmp_path))
    assert result.returncode == 1
    assert "no experiment named 'nope'" in result.stderr
