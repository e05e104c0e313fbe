"""visiontune-evaluate against a real training run's logged model, in a real store, on real images.

One training run (the module's fixture) serves every test. The end-to-end test runs the command
as a user does; the others call its main() in this process, which already holds torch and
MLflow, to keep the file within its time budget.
"""

from __future__ import annotations

import csv
import logging
import re
import shutil
from types import SimpleNamespace

import pytest

from helpers import FAST, run_cli
from visiontune import store
from visiontune.commands import evaluate


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_folder):
    """A launch dir whose store holds one finished training run on tiny_folder, with its model."""
    from mlflow.tracking import MlflowClient

    cwd = tmp_path_factory.mktemp("evaluate-launch")
    data = ("data=imagefolder", f"data.root={tiny_folder}")
    result = run_cli(cwd, "model=squeezenet", "mode=scratch", *data, *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    uri = f"sqlite:///{cwd / 'outputs' / 'mlflow.db'}"
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("visiontune").experiment_id])
    return SimpleNamespace(cwd=cwd, uri=uri, client=client, run=run)


def evaluation_runs(client, data_tag: str) -> list:
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, f"tags.`{store.tags.DATA}` = '{data_tag}'")
    return [r for r in runs if store.tags.EVALUATES in r.data.tags]


def read_csv(path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_evaluation_scores_the_model_as_its_pyfunc_and_its_training_run_do(trained, tiny_folder, tmp_path):
    import mlflow
    import pandas as pd

    run_id, out = trained.run.info.run_id, tmp_path / "out"
    result = run_cli(
        trained.cwd,
        run_id,
        "--data",
        str(tiny_folder),
        "--out",
        str(out),
        module="visiontune.commands.evaluate",
    )
    assert result.returncode == 0, result.stderr[-3000:]

    # What the logged model says through MLflow's own pyfunc, compared with the folder's truth.
    val = sorted((tiny_folder / "val").glob("*/*.jpg"))
    mlflow.set_tracking_uri(trained.uri)
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{run_id}/model", model_config={"read_paths": True})
    said = pyfunc.predict(pd.DataFrame({"image": [str(p) for p in val]}))
    accuracy = sum(c == p.parent.name for c, p in zip(said["class"], val, strict=True)) / len(val)
    assert accuracy == pytest.approx(trained.run.data.metrics["best_val_acc"], abs=1e-9)
    printed = re.search(r"^accuracy\s+([0-9.]+)\s+\(8 images of .*, 0 skipped\)$", result.stdout, re.M)
    assert printed and float(printed.group(1)) == pytest.approx(accuracy, abs=5e-5), result.stdout
    predictions = read_csv(out / "predictions.csv")
    assert [r["path"] for r in predictions] == [str(p) for p in val]
    assert [r["predicted"] for r in predictions] == list(said["class"])
    assert [float(r["probability"]) for r in predictions] == pytest.approx(
        list(said["probability"]), abs=1e-5
    )

    (evaluation,) = evaluation_runs(trained.client, str(tiny_folder))
    assert evaluation.info.status == "FINISHED"
    assert evaluation.info.experiment_id == trained.run.info.experiment_id
    assert evaluation.info.run_name == f"evaluate-{run_id[:8]}-{tiny_folder.name}"
    tags, metrics = evaluation.data.tags, evaluation.data.metrics
    assert tags[store.tags.EVALUATES] == f"runs:/{run_id}/model"
    assert tags[store.tags.SOURCE_RUN] == run_id
    assert evaluation.data.params["images"] == "8" and evaluation.data.params["skipped_images"] == "0"
    assert metrics["eval_accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert {"eval_macro_f1", "eval_recall_ants", "eval_recall_bees", "eval_f1_ants"} <= set(metrics)
    # MLflow 3 files them under the logged model too.
    (logged,) = trained.client.search_logged_models([trained.run.info.experiment_id])
    assert {m.key for m in logged.metrics if m.run_id == evaluation.info.run_id} == set(metrics)

    artifacts = {a.path for a in trained.client.list_artifacts(evaluation.info.run_id)}
    assert {"confusion_matrix.png", "confident_mistakes.png", "per_class.csv", "predictions.csv"} <= artifacts
    assert {p.name for p in out.iterdir()} == artifacts
    matrix = read_csv(out / "confusion_matrix.csv")
    assert sum(int(row[c]) for row in matrix for c in ("ants", "bees")) == len(val)
    last = result.stdout.strip().splitlines()[-1]
    assert evaluation.info.run_id in last and "visiontune-ui" in last


def test_an_unknown_class_a_missing_model_or_folder_is_one_line_and_no_run(
    trained, tiny_folder, tmp_path, capsys
):
    with_wasps = tmp_path / "with-wasps"
    shutil.copytree(tiny_folder / "val", with_wasps / "val")
    shutil.copytree(tiny_folder / "val" / "ants", with_wasps / "val" / "wasps")
    model, nowhere, no_such_run = trained.run.info.run_id, tmp_path / "nowhere", "0" * 32
    cases = [
        ((model, with_wasps), ["'wasps'", "'bees'"]),  # names the class and the model's classes
        ((no_such_run, tiny_folder), [no_such_run]),
        ((model, nowhere), [str(nowhere)]),
    ]

    def every_run() -> set[str]:
        experiments = [e.experiment_id for e in trained.client.search_experiments()]
        return {r.info.run_id for r in trained.client.search_runs(experiments)}

    before = every_run()
    for (given, data), named in cases:
        code = evaluate.main(
            [given, "--data", str(data), "--tracking-uri", trained.uri, "--num-workers", "0"]
        )
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert code == 1
        assert line.startswith("visiontune-evaluate: error:") and all(n in line for n in named), line
    assert every_run() == before


def test_a_flat_folder_is_evaluated_and_an_unreadable_image_skipped(
    trained, tiny_folder, tmp_path, capsys, caplog
):
    flat = tmp_path / "flat"
    shutil.copytree(tiny_folder / "val", flat)  # flat/<class>/*.jpg, no val/
    broken = flat / "ants" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    model = f"runs:/{trained.run.info.run_id}/model"

    with caplog.at_level(logging.WARNING, logger="visiontune.data"):
        code = evaluate.main(
            [
                model,
                "--data",
                str(flat),
                "--tracking-uri",
                trained.uri,
                "--batch-size",
                "3",
                "--num-workers",
                "0",
                "--tta",
            ]
        )

    stdout = capsys.readouterr().out
    assert code == 0
    assert f"skipping image that does not decode: {broken}" in caplog.text
    assert re.search(r"^accuracy with TTA\s+[0-9.]+\s+\([+-][0-9.]+: each image and its mirror", stdout, re.M)
    assert re.search(
        rf"^accuracy\s+[0-9.]+\s+\(8 images of {re.escape(str(flat))}, 1 skipped\)$", stdout, re.M
    )
    (evaluation,) = evaluation_runs(trained.client, str(flat))
    assert evaluation.info.status == "FINISHED" and evaluation.info.run_name.endswith("-flat")
    assert evaluation.data.params["images"] == "9" and evaluation.data.params["skipped_images"] == "1"
    assert evaluation.data.params["tta"] == "True" and 0 <= evaluation.data.metrics["eval_accuracy_tta"] <= 1
    local = trained.client.download_artifacts(evaluation.info.run_id, "predictions.csv", str(tmp_path))
    rows = {row["path"]: row for row in read_csv(local)}
    assert rows[str(broken)]["predicted"] == "" and len(rows) == 9
    per_class = read_csv(
        trained.client.download_artifacts(evaluation.info.run_id, "per_class.csv", str(tmp_path))
    )
    assert {r["class"]: int(r["support"]) for r in per_class} == {"ants": 4, "bees": 4}
