"""Scaling out: sweeps through Hydra's submitit launcher, and many jobs writing to one MLflow server.

No SLURM here: submitit_local runs the same launcher, pickles and signal handling as
submitit_slurm, with local processes. The server is a real `mlflow server` on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from helpers import FAST, background_server, cli_env, free_port, has_metric, run_cli, store_runs
from visiontune import store

EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "epoch_seconds", "lr")


def data_args(tiny_folder) -> list[str]:
    return [f"data.root={tiny_folder}", "data=imagefolder", "mode=scratch"]


def sweep_runs(tracking: str | Path):
    """(parent, children) of the one sweep in a store: a SQLite file's path or a server's URI."""
    if isinstance(tracking, Path):
        runs = store_runs(tracking)
    else:
        client = MlflowClient(tracking)
        runs = client.search_runs([client.get_experiment_by_name("visiontune").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("visiontune.sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 1 + len(children), "every job is a child of the sweep's parent"
    return parent, children


# --- SLURM sweeps, tried with submitit_local -----------------------------------------------------


def test_a_submitit_local_sweep_is_one_parent_with_finished_children(tmp_path, tiny_folder):
    args = ["-m", "seed=1,2", *data_args(tiny_folder), *FAST, "mlflow.log_model=false"]
    result = run_cli(tmp_path, *args, "hydra/launcher=submitit_local", timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]

    parent, children = sweep_runs(tmp_path / "outputs" / "mlflow.db")
    assert parent.info.status == "FINISHED"
    assert sorted(c.info.run_name for c in children) == ["squeezenet-scratch #0", "squeezenet-scratch #1"]
    assert [c.info.status for c in children] == ["FINISHED", "FINISHED"]
    assert "| squeezenet-scratch #1 |" in result.stdout, "the launching process prints the leaderboard"
    assert "each job's console goes to" in result.stdout + result.stderr
    # Each job ran in a process of its own, its console in submitit's folder, its lines numbered.
    logs = sorted((tmp_path / "outputs" / "multirun").glob("*/*/.submitit/*/*_0_log.err"))
    assert len(logs) == 2
    epoch_lines = sorted(
        line[:3] for log in logs for line in log.read_text().splitlines() if "epoch 1/1" in line
    )
    assert epoch_lines == ["#0 ", "#1 "]


def _descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process below `pid`."""
    found = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in map(int, children.read_text().split()):
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            found += [(child, cmdline), *_descendants(child)]
    return found


@pytest.mark.slow  # 25 s: a job preempted after its first epoch, requeued and finished
def test_a_preempted_submitit_job_is_requeued_and_continues_its_own_mlflow_run(tmp_path, tiny_folder):
    """submitit's preemption signal (USR2; SLURM sends it before a preemption or the time limit),
    sent to the job's process once it has logged an epoch: submitit requeues the job, and the
    job's next process continues the same MLflow run from its checkpoint."""
    epochs = 40
    fast = [o for o in FAST if not o.startswith("epochs=")]
    args = ["-m", "seed=1", *data_args(tiny_folder), *fast, f"epochs={epochs}", "mlflow.log_model=false"]
    launcher = subprocess.Popen(
        [sys.executable, "-m", "visiontune.train", *args, "hydra/launcher=submitit_local"],
        **{"cwd": tmp_path, "env": cli_env(tmp_path), "stdout": subprocess.PIPE, "stderr": subprocess.STDOUT},
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not has_metric(tmp_path / "outputs" / "mlflow.db", "val_acc"):
            assert time.monotonic() < deadline and launcher.poll() is None, "no epoch logged"
            time.sleep(0.05)
        (job,) = [pid for pid, cmd in _descendants(launcher.pid) if "submitit.core._submit" in cmd]
        os.kill(job, signal.SIGUSR2)  # the job's own process, not submitit's controller above it
        output = launcher.communicate(timeout=240)[0]
    finally:
        launcher.kill()
    assert launcher.returncode == 0, output[-3000:]

    parent, (child,) = sweep_runs(tmp_path / "outputs" / "mlflow.db")
    assert parent.info.status == "FINISHED" and child.info.status == "FINISHED"
    (log,) = (tmp_path / "outputs" / "multirun").glob("*/*/.submitit/*/*_0_log.err")
    text = log.read_text()
    assert "Requeued job" in text and "requeued (preempted or out of time)" in text, text[-3000:]
    resumed = re.search(f"resuming MLflow run {child.info.run_id} after epoch (\\d+) of {epochs}", text)
    assert resumed and int(resumed.group(1)) < epochs, text[-3000:]
    steps = [
        m.step
        for m in MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}").get_metric_history(
            child.info.run_id, "val_acc"
        )
    ]
    assert sorted(steps) == list(range(1, epochs + 1)), "every epoch logged once, across both processes"


def _job_process(launch_dir: Path, number: int) -> int:
    """The pid of sweep job `number` under submitit_local, once it has logged: its console's
    folder is named after its controller's pid, and the job is that controller's child."""
    (log,) = [
        log
        for log in (launch_dir / "outputs" / "multirun").glob("*/*/.submitit/*/*_0_log.err")
        if f"#{number} [" in log.read_text()
    ]
    controller = int(log.parent.name)
    (job,) = [pid for pid, cmd in _descendants(controller) if "submitit.core._submit" in cmd]
    return job


@pytest.mark.slow  # 30 s: a killed job, the other one stopped by the test
def test_a_killed_submitit_job_stops_the_wait_in_one_line_and_leaves_running_jobs_alone(
    tmp_path, tiny_folder
):
    fast = [o for o in FAST if not o.startswith("epochs=")]
    args = ["-m", "seed=1,2", *data_args(tiny_folder), *fast, "epochs=500", "mlflow.log_model=false"]
    # To a file: the job left running holds what submitit_local's processes inherited (a pipe's end).
    console = open(tmp_path / "console.txt", "w")  # noqa: SIM115
    launcher = subprocess.Popen(
        [sys.executable, "-m", "visiontune.train", *args, "hydra/launcher=submitit_local"],
        **{"cwd": tmp_path, "env": cli_env(tmp_path), "stdout": console, "stderr": console},
    )
    jobs = []
    try:
        deadline = time.monotonic() + 120
        while not has_metric(tmp_path / "outputs" / "mlflow.db", "val_acc"):
            assert time.monotonic() < deadline and launcher.poll() is None, "no epoch logged"
            time.sleep(0.05)
        below = _descendants(launcher.pid)
        jobs = [pid for pid, cmd in below if "submitit" in cmd]  # controllers and their jobs
        # Job #0's process: Hydra's launcher waits for the jobs in their order.
        os.kill(_job_process(tmp_path, 0), signal.SIGKILL)  # as an OOM kill, or scancel's last word
        launcher.wait(timeout=120)
    finally:
        launcher.kill()
        console.close()
        for pid in jobs:  # the job still training: submitit ignores SIGTERM in it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    stderr = (tmp_path / "console.txt").read_text()
    assert launcher.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "ended without a result" in errors[0] and "resume=last" in errors[0], errors
    parent, children = sweep_runs(tmp_path / "outputs" / "mlflow.db")
    assert parent.info.status == "FAILED" and parent.info.run_id in errors[0]
    assert [c.info.status for c in children] == ["RUNNING", "RUNNING"], (
        "a job elsewhere may still be training"
    )


def test_a_sweep_job_still_training_under_submitit_is_not_continued_twice(tmp_path):
    """resume=last while a job of the stopped sweep still trains (its siblings were killed): the
    new job refuses, where continuing the same run from two processes would log epochs twice."""
    from mlflow.tracking import MlflowClient

    from helpers import compose_cfg
    from visiontune import VisiontuneError, resume, sweep
    from visiontune.config import Job

    uri = store.tracking_uri(None, tmp_path)
    experiment_id = store.ensure_experiment(uri, "visiontune")
    parent = store.ParentRun.start(uri, experiment_id, "sweep-x", {})
    sweep.write_handoff(tmp_path / "sweep", parent.run_id, ["seed"])
    job = Job(
        tmp_path,
        tmp_path / "sweep" / "0",
        tmp_path / "x.log",
        {},
        ["seed=1"],
        0,
        tmp_path / "sweep",
        started=0.0,
    )
    # A submitit job's command line names submitit, not visiontune: it still counts as alive.
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "submitit.core._submit"])
    try:
        tags = {
            "mlflow.parentRunId": parent.run_id,
            store.tags.JOB: sweep.overrides_key(["seed=1"]),
            store.tags.PROCESS: f"{socket.gethostname()}:{trainer.pid}",
        }
        child = MlflowClient(uri).create_run(experiment_id, run_name="squeezenet-scratch #0", tags=tags)
        with pytest.raises(VisiontuneError, match="is still being trained by process"):
            resume.decide(compose_cfg("resume=last"), job, False, store.open_store(uri), experiment_id)
    finally:
        trainer.kill()
        trainer.wait()
    earlier = resume.decide(compose_cfg("resume=last"), job, False, store.open_store(uri), experiment_id)
    assert earlier.run_id == child.info.run_id, "once that process is gone, the job continues its run"


# --- one MLflow server for every job -------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The README's `mlflow server`: a SQLite backend and artifacts served through it, in a tmp folder."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--workers", "1"]
    command += ["--artifacts-destination", str(folder / "artifacts")]
    env = cli_env(folder) | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    url = f"http://127.0.0.1:{port}"
    log = folder / "server.log"
    with background_server(command, folder, env, f"{url}/health", log):
        yield SimpleNamespace(url=url, log=log)


def test_a_parallel_sweep_writes_every_epoch_to_one_server(tmp_path, tiny_folder, server):
    fast = [o for o in FAST if not o.startswith(("epochs=", "num_workers="))]
    args = ["-m", "seed=1,2,3,4", *data_args(tiny_folder), *fast, "epochs=2", "num_workers=0"]
    args += ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"mlflow.tracking_uri={server.url}"]
    result = run_cli(tmp_path, *args, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "outputs" / "mlflow.db").exists(), "nothing written to a local store"

    parent, children = sweep_runs(server.url)
    assert parent.info.status == "FINISHED" and len(children) == 4
    client = MlflowClient(server.url)
    for child in children:
        assert child.info.status == "FINISHED", child.data.tags.get("error")
        for key in EPOCH_METRICS:
            steps = [m.step for m in client.get_metric_history(child.info.run_id, key)]
            assert sorted(steps) == [1, 2], f"{child.info.run_name} {key}: steps {steps}"
        assert child.info.artifact_uri.startswith("mlflow-artifacts:"), "artifacts go through the server"
    logs = result.stdout + result.stderr + server.log.read_text()
    assert "database is locked" not in logs

    # The commands over the same server: a leaderboard, the UI's link, a prediction from runs:/.
    compared = run_cli(
        tmp_path, "--parent", parent.info.run_id, "--out", "report", "--tracking-uri", server.url,
        module="visiontune.commands.compare", timeout=120,
    )  # fmt: skip
    assert compared.returncode == 0, compared.stderr[-2000:]
    assert compared.stdout.count("| squeezenet-scratch #") == 4
    assert (tmp_path / "report" / "val_acc_overlay.png").is_file()

    ui = run_cli(tmp_path, "--tracking-uri", server.url, module="visiontune.commands.ui", timeout=60)
    assert ui.returncode == 0, ui.stderr
    experiment_id = parent.info.experiment_id
    assert f"open {server.url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning" in ui.stdout
    assert not store.missing_store(server.url)

    best = parent.data.tags["best_child_run_id"]
    predicted = run_cli(
        tmp_path, f"runs:/{best}/model", str(tiny_folder / "val"), "--tracking-uri", server.url,
        "--num-workers", "0", module="visiontune.commands.predict", timeout=120,
    )  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    assert len(predicted.stdout.splitlines()) == 1 + 8, "a header and one row per val image"


def test_a_server_that_does_not_answer_is_one_line_at_once(tmp_path, tiny_folder):
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    args = ["-m", "seed=1,2", *data_args(tiny_folder), f"mlflow.tracking_uri={down}"]
    swept = run_cli(tmp_path, *args, timeout=90)
    args = ["--experiment", "x", "--out", "r", "--tracking-uri", down]
    compared = run_cli(tmp_path, *args, module="visiontune.commands.compare", timeout=90)
    assert time.monotonic() - started < 60, "not MLflow's minutes of retries"
    for result in (swept, compared):
        assert result.returncode == 1
        errors = [line for line in result.stderr.splitlines() if line.strip()]
        assert (
            len(errors) == 1 and f"cannot reach the MLflow server {down} (Connection refused)" in errors[0]
        ), result.stderr
    assert "Launching" not in swept.stdout + swept.stderr, "no job runs without its store"
