"""report.py: leaderboards ranked within their data, and accuracy curves whose legend hides none.
visiontune-compare on a real sweep: tests/e2e/test_compare.py."""

from __future__ import annotations

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
