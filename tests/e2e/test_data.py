"""Data layouts end to end: one folder split for the run with a test split that visiontune-evaluate
agrees with, a multi-label CSV run whose model lists several labels, and a bad CSV refused first."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from helpers import FAST, make_image_folder, run_cli, store_runs
from visiontune import report


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """One folder of class folders, no train/ or val/: 10 ants, 10 bees."""
    return make_image_folder(tmp_path_factory.mktemp("layouts"), {"all": 10}) / "all"


def _finished_run(cwd: Path):
    (run,) = store_runs(cwd / "outputs" / "mlflow.db")
    assert run.info.status == "FINISHED"
    return run


def test_one_folder_split_with_a_test_split_that_evaluate_agrees_with(images, tmp_path, standin_weights):
    from mlflow.tracking import MlflowClient

    weights = f"model.weights={standin_weights('squeezenet1_0')}"
    data = ("data=imagefolder", f"data.root={images}", "data.test_fraction=0.2")
    result = run_cli(tmp_path, "model=squeezenet", "mode=feature_extract", weights, *data, *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    run = _finished_run(tmp_path)
    client = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    params, metrics = run.data.params, run.data.metrics
    assert (params["train_images"], params["val_images"], params["test_images"]) == ("12", "4", "4")
    contexts = {i.dataset.name: [t.value for t in i.tags][0] for i in run.inputs.dataset_inputs}
    assert contexts == {"all/train": "training", "all/val": "validation", "all/test": "testing"}
    assert {"test_acc", "test_loss", "test_balanced_acc", "test_macro_f1", "test_recall_ants"} <= set(metrics)

    # The logged split's test files, as a folder of class folders for visiontune-evaluate.
    listed = Path(client.download_artifacts(run.info.run_id, "splits/test.csv", str(tmp_path)))
    rows = list(csv.DictReader(listed.open()))
    assert {row["class"] for row in rows} == {"ants", "bees"} and len(rows) == 4
    for row in rows:
        (tmp_path / "test" / row["class"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(images / row["path"], tmp_path / "test" / row["class"])
    evaluated = run_cli(
        tmp_path, run.info.run_id, "--data", str(tmp_path / "test"), module="visiontune.commands.evaluate"
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    (evaluation,) = [
        r for r in store_runs(tmp_path / "outputs" / "mlflow.db") if r.info.run_id != run.info.run_id
    ]
    assert evaluation.data.metrics["eval_accuracy"] == pytest.approx(metrics["test_acc"], abs=1e-9)
    assert evaluation.data.metrics["eval_balanced_accuracy"] == pytest.approx(
        metrics["test_balanced_acc"], abs=1e-9
    )

    rows, _ = report.leaderboard(client, [run])
    assert rows[0]["test_acc"] == metrics["test_acc"] and "Ranked by best_val_acc" in report.to_markdown(rows)


def test_multi_label_csv_run_logs_map_predict_lists_several_labels_evaluate_scores_map(
    images, tmp_path, standin_weights
):
    table = tmp_path / "train.csv"
    with table.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        for i, image in enumerate(sorted(images.glob("*/*.jpg"))):
            writer.writerow(
                [image.relative_to(images).as_posix(), f"{image.parent.name}|{'odd' if i % 2 else 'even'}"]
            )
    weights = f"model.weights={standin_weights('squeezenet1_0')}"
    data = ("data=csv", f"data.train_csv={table}", f"data.image_root={images}", 'data.label_delim="|"')
    result = run_cli(tmp_path, "model=squeezenet", "mode=feature_extract", weights, *data, *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    run = _finished_run(tmp_path)
    assert {"val_mAP", "val_micro_f1", "val_macro_f1", "best_val_mAP"} <= set(run.data.metrics)
    assert run.data.params["multilabel"] == "true"

    predicted = run_cli(
        tmp_path, run.info.run_id, str(images / "ants"), "--threshold", "0.01", "--format", "json",
        module="visiontune.commands.predict",
    )  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    rows = json.loads(predicted.stdout)
    assert len(rows) == 10 and all(len(row["top_k"]) >= 2 for row in rows)
    assert {c["class"] for c in rows[0]["top_k"]} <= {"ants", "bees", "even", "odd"}

    evaluated = run_cli(
        tmp_path, run.info.run_id, "--data", str(table), "--image-root", str(images), "--num-workers", "0",
        module="visiontune.commands.evaluate",
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert evaluated.stdout.startswith("mAP  ") and "(20 images of" in evaluated.stdout


def test_a_bad_csv_row_is_one_line_before_any_run(images, tmp_path):
    table = tmp_path / "train.csv"
    table.write_text("path,label\nants/ants_0.jpg,ants\nants/missing.jpg,ants\n")
    result = run_cli(tmp_path, "data=csv", f"data.train_csv={table}", f"data.image_root={images}", *FAST)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "row 3" in line]
    assert len(errors) == 1 and "missing.jpg does not exist" in errors[0], result.stderr
    assert not (tmp_path / "outputs" / "mlflow.db").exists()
