"""Processes sharing a store: several opening a new SQLite store at once leave it whole."""

from __future__ import annotations

from mlflow.tracking import MlflowClient


def test_processes_opening_a_new_store_at_once_leave_it_whole(tmp_path):
    """MLflow migrates a new SQLite file on open; unguarded, concurrent openers break it."""
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}"
    code = "import sys; from visiontune import store; store.ensure_experiment(sys.argv[1], 'shared')"
    openers = [
        subprocess.Popen([sys.executable, "-c", code, uri], stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    errors = [p.communicate(timeout=120)[1] for p in openers]
    assert [p.returncode for p in openers] == [0, 0, 0], errors
    client = MlflowClient(uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "shared"]
    client.create_run(experiment.experiment_id)  # the store takes writes
