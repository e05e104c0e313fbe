"""report.py: leaderboards ranked within their data, and accuracy curves whose legend hides none.
visiontune-compare on a real sweep: tests/e2e/test_compare.py."""

from __future__ import annotations

import csv

import pytest


@pytest.fixture
def two_datasets(tmp_path):
    """A real store with finished runs on two data folders, made through MLflow's client."""
    from mlflow.tracking import MlflowClient

    from visiontune import store

    uri = store.tracking_uri(None, tmp_path)
    client = MlflowClient(uri)
    experiment_id = store.ensure_experiment(uri, "mixed")
    for name, root, acc in [
        ("a", "/data/flowers", 0.7),
        ("b", "/data/ants", 0.9),
        ("c", "/data/flowers", 0.8),
    ]:
        run = client.create_run(experiment_id, run_name=name)
        client.log_param(run.info.run_id, "data.root", root)
        client.log_metric(run.info.run_id, "best_val_acc", acc)
        client.log_metric(run.info.run_id, "val_acc", acc, step=1)
        client.set_terminated(run.info.run_id, "FINISHED")
    return client, client.search_runs([experiment_id])


def test_runs_on_different_data_are_ranked_within_their_data(two_datasets):
    from visiontune import report

    client, runs = two_datasets
    rows, _ = report.leaderboard(client, runs)
    assert [(r["data"], r["run"]) for r in rows] == [
        ("/data/ants", "b"),
        ("/data/flowers", "c"),
        ("/data/flowers", "a"),
    ]
    markdown = report.to_markdown(rows)
    assert markdown.startswith("| run | model | mode | data |")
    assert all(r["run_id"] in markdown for r in rows), "run ids to copy into visiontune commands"


def test_one_data_folder_needs_no_data_column(two_datasets):
    from visiontune import report

    client, runs = two_datasets
    rows, _ = report.leaderboard(client, [r for r in runs if r.data.params["data.root"] == "/data/flowers"])
    assert "data" not in rows[0] and [r["run"] for r in rows] == ["c", "a"]


def test_the_overlay_legend_hides_no_curve():
    from visiontune import report

    curves = {f"run {i}": [0.1 * i, 0.1 * i + 0.05, 0.9] for i in range(9)}
    figure = report.accuracy_curves(curves, "t")
    renderer = figure.canvas.get_renderer()
    (axes,) = figure.axes
    legend = axes.get_legend().get_window_extent(renderer)
    plot = axes.get_window_extent(renderer)
    assert legend.x0 >= plot.x1, "the legend stands beside the plot, not on it"


@pytest.fixture
def repeated_sweep(tmp_path):
    """A real store holding one sweep's parent (varying model, seed and data.fold) and its children:
    two models, each trained on two seeds x two folds, one of resnet's runs FAILED."""
    from mlflow.tracking import MlflowClient

    from visiontune import store

    uri = store.tracking_uri(None, tmp_path)
    client = MlflowClient(uri)
    experiment_id = store.ensure_experiment(uri, "repeats")
    parent = client.create_run(experiment_id, run_name="sweep", tags={store.tags.SWEEP: "parent"})
    client.set_tag(parent.info.run_id, store.tags.SWEEP_VARIED, "model,seed,data.fold")
    accuracies = {"resnet": [0.9, 0.7, 0.8, None], "squeezenet": [0.75, 0.75, 0.75, 0.75]}
    for model, values in accuracies.items():
        for i, acc in enumerate(values):
            tags = {store.tags.PARENT_RUN: parent.info.run_id, "model": model}
            run = client.create_run(experiment_id, run_name=f"{model} #{i}", tags=tags)
            params = {"model.name": model, "seed": str(42 + i // 2), "data.fold": str(i % 2)}
            for key, value in params.items():
                client.log_param(run.info.run_id, key, value)
            if acc is not None:
                client.log_metric(run.info.run_id, "best_val_acc", acc)
            client.set_terminated(run.info.run_id, "FINISHED" if acc is not None else "FAILED")
    return client, store.children_of(client, parent.info.run_id)


def test_seeds_and_folds_of_one_configuration_rank_by_their_mean(repeated_sweep, tmp_path):
    from visiontune import report

    client, runs = repeated_sweep
    report.write_report(client, runs, tmp_path / "out")
    rows = list(csv.DictReader((tmp_path / "out" / "configurations.csv").open()))
    # resnet's best run (0.9) beats every squeezenet run, but its mean (0.8 over 3) does not beat 0.75
    # by as much as its spread: the ranking is by the mean, 0.8 > 0.75.
    assert [(r["config"], r["model"], r["n"], r["runs"]) for r in rows] == [
        ("1", "resnet", "3", "4"),
        ("2", "squeezenet", "4", "4"),
    ]
    assert float(rows[0]["best_val_acc_mean"]) == pytest.approx(0.8)
    assert float(rows[0]["best_val_acc_std"]) == pytest.approx(0.1), "the sample standard deviation"
    assert float(rows[1]["best_val_acc_std"]) == 0.0
    assert "seed" not in rows[0] and "data.fold" not in rows[0], "seeds and folds are what it averages over"

    markdown = (tmp_path / "out" / "leaderboard.md").read_text()
    lines = markdown.splitlines()
    assert any(
        line.startswith("| 1 | resnet |") and line.endswith("| 3 | 4 | 0.8000 ± 0.1000 |") for line in lines
    )
    runs_table = list(csv.DictReader((tmp_path / "out" / "leaderboard.csv").open()))
    assert [(r["config"], r["run"]) for r in runs_table] == [
        *[("1", f"resnet #{i}") for i in (0, 2, 1, 3)],  # each configuration's runs, best first
        *[("2", f"squeezenet #{i}") for i in range(4)],
    ]
    assert {(r["seed"], r["data.fold"]) for r in runs_table[4:]} == {
        ("42", "0"),
        ("42", "1"),
        ("43", "0"),
        ("43", "1"),
    }


def test_a_leaderboard_without_repeats_has_no_configurations(two_datasets, tmp_path):
    from visiontune import report

    client, runs = two_datasets
    rows = report.write_report(client, runs, tmp_path / "out")
    assert "config" not in rows[0] and report.configurations(rows) == []
    assert not (tmp_path / "out" / "configurations.csv").exists()
    assert (tmp_path / "out" / "leaderboard.md").read_text().startswith("| run |")
