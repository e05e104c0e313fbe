"""Processes and their store: a new SQLite store opened at once by several, a server lost mid-run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

from mlflow.tracking import MlflowClient

from helpers import FAST, background_server, cli_env, free_port


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


def _mlflow_server(folder, port: int):
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--workers", "1"]
    command += ["--artifacts-destination", str(folder / "artifacts")]
    env = cli_env(folder) | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return background_server(command, folder, env, f"http://127.0.0.1:{port}/health", folder / "log")


def _first_epoch_logged(client: MlflowClient, trainer) -> str:
    while trainer.poll() is None:
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        if runs and "val_acc" in runs[0].data.metrics:
            return runs[0].info.run_id
        time.sleep(0.2)
    raise AssertionError(f"the run ended before its first epoch: {trainer.stderr.read()[-2000:]}")


def test_a_server_gone_for_good_costs_one_retry_chain_and_the_run_resumes_once_it_is_back(
    tmp_path, tiny_folder
):
    """Item 14: each write on the way out used to wait its own ~4-minute chain of MLflow's retries."""
    port, server_dir = free_port(), tmp_path / "server"
    server_dir.mkdir()
    url = f"http://127.0.0.1:{port}"
    args = [f"data.root={tiny_folder}", "data=imagefolder", "mode=scratch", *FAST[1:]]
    args += [f"mlflow.tracking_uri={url}", "mlflow.log_model=false"]
    # A short chain (1 + 2 + 4 s) for the test; the default is 7 retries, about 4 minutes.
    env = cli_env(tmp_path) | {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    }
    command = [sys.executable, "-m", "visiontune.train", *args, "epochs=200"]
    with _mlflow_server(server_dir, port) as server:
        trainer = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
        run_id = _first_epoch_logged(MlflowClient(url), trainer)
        os.killpg(server.pid, signal.SIGKILL)  # the server and its uvicorn worker, at once
        stderr = trainer.communicate(timeout=300)[1]
    assert trainer.returncode == 1
    chains = re.findall(r"Retrying \(Retry\(total=0, .*?: (\S+)$", stderr, re.M)
    assert len(chains) == 1, f"one chain of retries for the whole outage, not one per write: {chains}"
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and f"resume={run_id}" in errors[0] and url in errors[0], stderr[-3000:]

    with _mlflow_server(server_dir, port):
        resumed = subprocess.run(
            [sys.executable, "-m", "visiontune.train", *args, "epochs=3", f"resume={run_id}"],
            cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        client = MlflowClient(url)
        run, history = client.get_run(run_id), client.get_metric_history(run_id, "val_acc")
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in history) == [1, 2, 3], "the epoch before the outage kept, none twice"
