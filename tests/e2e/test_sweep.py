"""Multiruns as one MLflow experiment, end to end: a parent run, its children, the summary on the
parent, Ctrl-C and killed workers, resume_last, the four-mode comparison."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import FAST, count_in_store, interrupt_once_training, run_cli, store_runs


def sweep(cwd, tiny_folder, *extra, workers=0):
    fast = [o for o in FAST if not o.startswith("num_workers=")]
    return run_cli(
        cwd, "-m", f"data.root={tiny_folder}", "data=imagefolder", *fast, f"num_workers={workers}", *extra
    )


def parent_and_children(cwd):
    runs = store_runs(cwd / "outputs" / "mlflow.db")
    (parent,) = [r for r in runs if r.data.tags.get("visiontune.sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 1 + len(children), "every job is a child of the sweep's parent"
    return parent, children


def summary(cwd, parent):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{cwd / 'outputs' / 'mlflow.db'}")
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"leaderboard.csv", "leaderboard.md", "val_acc_overlay.png"} <= names
    text = client.download_artifacts(parent.info.run_id, "leaderboard.csv")
    with open(text) as f:
        return list(csv.DictReader(io.StringIO(f.read())))


# The basic launcher's sweep is also what every test on the shared `tiny_sweep` reads: slow here.
@pytest.mark.parametrize("launcher", [pytest.param("basic", marks=pytest.mark.slow), "joblib"])
def test_multirun_is_one_parent_with_its_jobs_as_children(tmp_path, tiny_folder, launcher):
    extra = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"] if launcher == "joblib" else []
    # joblib's worker processes start DataLoader workers of their own (num_workers=1).
    workers = 1 if launcher == "joblib" else 0
    result = sweep(tmp_path, tiny_folder, "model=squeezenet,resnet", "mode=scratch", *extra, workers=workers)
    assert result.returncode == 0, result.stderr[-3000:]

    parent, children = parent_and_children(tmp_path)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["sweep.varied"] == "model"
    assert sorted(c.info.run_name for c in children) == ["resnet-scratch", "squeezenet-scratch"]
    assert all(c.info.status == "FINISHED" for c in children)
    assert {c.data.tags["model"] for c in children} == {"squeezenet", "resnet"}
    epoch_lines = [line for line in result.stderr.splitlines() if "epoch 1/1" in line]
    assert sorted(line[:3] for line in epoch_lines) == ["#0 ", "#1 "], "each job's lines say which job"

    rows = summary(tmp_path, parent)
    assert [r["run"] for r in rows] == [
        c.info.run_name
        for c in sorted(children, key=lambda c: (-c.data.metrics["best_val_acc"], c.info.run_name))
    ]
    assert {r["run_id"]: float(r["best_val_acc"]) for r in rows} == {
        c.info.run_id: c.data.metrics["best_val_acc"] for c in children
    }
    assert parent.data.tags["best_child_run_id"] == rows[0]["run_id"]
    assert "| squeezenet-scratch |" in result.stdout  # the leaderboard is printed too


def test_failed_job_is_a_failed_child_and_the_sweep_goes_on(tmp_path, tiny_folder):
    result = sweep(
        tmp_path,
        tiny_folder,
        "model=squeezenet",
        "mode=scratch,feature_extract",
        "model.weights=/missing.pth",
    )
    assert result.returncode != 0, "the command reports that a job failed"
    assert "1 of 2 jobs failed: squeezenet-feature_extract" in result.stderr
    assert "Traceback" not in result.stderr

    parent, children = parent_and_children(tmp_path)
    assert parent.info.status == "FINISHED"
    status = {c.info.run_name: c.info.status for c in children}
    assert status == {"squeezenet-scratch": "FINISHED", "squeezenet-feature_extract": "FAILED"}
    rows = {r["run"]: r for r in summary(tmp_path, parent)}
    assert rows["squeezenet-feature_extract"]["status"] == "FAILED"
    assert "no such file" in rows["squeezenet-feature_extract"]["error"]
    assert parent.data.tags["best_child"] == "squeezenet-scratch"


def test_ctrl_c_ends_the_sweep_killed_with_no_run_left_running(tmp_path, tiny_folder):
    fast = [o for o in FAST if not o.startswith("epochs=")]
    args = [
        "-m",
        f"data.root={tiny_folder}",
        "data=imagefolder",
        "mode=scratch",
        *fast,
        "epochs=500",
        "seed=1,2",
    ]
    returncode, stderr = interrupt_once_training(tmp_path, *args)
    assert returncode == 130, stderr[-3000:]
    store = tmp_path / "outputs" / "mlflow.db"
    statuses = {r.info.run_name: r.info.status for r in store_runs(store)}
    assert "RUNNING" not in statuses.values(), statuses
    parent, children = parent_and_children(tmp_path)
    assert parent.info.status == "KILLED" and [c.info.status for c in children] == ["KILLED"]


def test_sweep_on_an_unusable_store_stops_before_any_job(tmp_path, tiny_folder):
    result = sweep(
        tmp_path, tiny_folder, "model=squeezenet", "mode=scratch", "seed=1,2", "mlflow.tracking_uri=foo://bar"
    )
    assert result.returncode == 1
    assert "error: cannot use the MLflow store mlflow.tracking_uri=foo://bar" in result.stderr
    assert "Launching" not in result.stdout + result.stderr, "no job may run without its parent"
    assert "Traceback" not in result.stderr


def test_an_artifact_folder_that_cannot_be_written_stops_the_sweep_before_any_job(tmp_path, tiny_folder):
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "mlartifacts").write_text("a file where the artifact folder belongs")
    result = sweep(tmp_path, tiny_folder, "model=squeezenet", "mode=scratch")
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "cannot write artifacts to" in errors[0], errors
    assert store_runs(tmp_path / "outputs" / "mlflow.db") == [], "no job ran, no run was recorded"


def _loky_workers(pid: int) -> list[int]:
    """Process ids of the joblib (loky) workers that process `pid` started."""
    workers = []
    for child in Path(f"/proc/{pid}/task").glob("*/children"):
        for cpid in child.read_text().split():
            cmdline = Path(f"/proc/{cpid}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"loky" in cmdline and b"resource_tracker" not in cmdline:
                workers.append(int(cpid))
    return workers


def test_a_killed_joblib_worker_stops_the_sweep_in_one_line_with_nothing_left_running(tmp_path, tiny_folder):
    import os
    import signal

    from helpers import after_first_epoch

    fast = [o for o in FAST if not o.startswith("epochs=")]
    args = ["-m", "seed=1,2,3,4", f"data.root={tiny_folder}", "data=imagefolder", "mode=scratch", *fast]
    args += ["epochs=300", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "mlflow.log_model=false"]
    with after_first_epoch(tmp_path, *args, poll=0.3) as running:
        os.kill(_loky_workers(running.process.pid)[0], signal.SIGKILL)
    stderr = running.stderr
    assert running.process.returncode == 1
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "worker process of the joblib launcher died" in errors[0], stderr[-3000:]
    parent, children = parent_and_children(tmp_path)
    assert parent.info.status == "FAILED" and parent.info.run_id in errors[0]
    assert children and all(c.info.status == "FAILED" for c in children), "nothing left RUNNING"


def _finished_runs(store) -> int:
    """How many runs the store holds as FINISHED (read without MLflow: nothing is migrated)."""
    return count_in_store(store, "SELECT count(*) FROM runs WHERE status = 'FINISHED'")


def test_a_killed_sweep_resumed_with_resume_last_trains_only_what_is_left(tmp_path, tiny_folder):
    import signal
    import subprocess
    import sys
    import time

    from helpers import cli_env

    fast = [o for o in FAST if not o.startswith("epochs=")]
    args = [
        "-m",
        "seed=1,2,3,4",
        f"data.root={tiny_folder}",
        "data=imagefolder",
        "mode=scratch",
        *fast,
        "epochs=3",
    ]
    store = tmp_path / "outputs" / "mlflow.db"
    process = subprocess.Popen(
        [sys.executable, "-m", "visiontune.train", *args, "mlflow.log_model=false"],
        **{
            "cwd": tmp_path,
            "env": cli_env(tmp_path),
            "stdout": subprocess.DEVNULL,
            "stderr": subprocess.DEVNULL,
        },
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and _finished_runs(store) < 2:
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        process.kill()
    parent, children = parent_and_children(tmp_path)
    done_before = {c.info.run_id: c.info.end_time for c in children if c.info.status == "FINISHED"}
    assert len(done_before) == 2 and parent.info.status == "RUNNING", "killed half-way"

    result = run_cli(tmp_path, *args, "mlflow.log_model=false", "resume=last")
    assert result.returncode == 0, result.stderr[-3000:]
    resumed_parent, children = parent_and_children(tmp_path)
    assert resumed_parent.info.run_id == parent.info.run_id and resumed_parent.info.status == "FINISHED"
    assert sorted(c.data.params["seed"] for c in children) == ["1", "2", "3", "4"], "one child per job"
    assert all(c.info.status == "FINISHED" for c in children)
    assert {c.info.run_id: c.info.end_time for c in children if c.info.run_id in done_before} == done_before
    assert result.stderr.count("not trained again") == 2
    assert len(summary(tmp_path, resumed_parent)) == 4, "the leaderboard covers every job"


def sweep_rows(client, parent_id) -> list[dict]:
    path = client.download_artifacts(parent_id, "leaderboard.csv")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_the_four_mode_comparison_with_staged_unfreezing_and_one_cycle(
    tmp_path, tiny_folder, standin_weights
):
    """The README's comparison command: feature_extract, finetune, staged and scratch side by side."""
    from mlflow.tracking import MlflowClient

    data = ("data=imagefolder", f"data.root={tiny_folder}", *(o for o in FAST if not o.startswith("epochs")))
    result = run_cli(
        tmp_path,
        "-m",
        "model=squeezenet",
        f"model.weights={standin_weights('squeezenet1_0')}",
        "mode=feature_extract,finetune,staged,scratch",
        "scheduler=onecycle",
        "optimizer.lr_decay=0.3",
        "epochs=2",
        *data,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    store = tmp_path / "outputs" / "mlflow.db"
    runs = store_runs(store)
    (parent,) = [r for r in runs if r.data.tags.get("visiontune.sweep") == "parent"]
    children = {
        r.data.tags["mode"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert sorted(children) == ["feature_extract", "finetune", "scratch", "staged"]
    assert all(r.info.status == "FINISHED" for r in children.values())
    client = MlflowClient(f"sqlite:///{store}")
    rows = sweep_rows(client, parent.info.run_id)
    assert len(rows) == 4

    staged = children["staged"]
    history = {
        key: [m.value for m in client.get_metric_history(staged.info.run_id, key)]
        for key in ("trainable_groups", "lr", "lr_early")
    }
    assert history["trainable_groups"] == [1, 4], "the stage changes at epoch 2"
    # Said as epoch 2 begins, before its own result line; the count is what trains once unfrozen.
    staged_lines = [line for line in result.stderr.splitlines() if line.startswith("#2 ")]  # job 2's console
    said = [
        i
        for i, line in enumerate(staged_lines)
        if "epoch 2: unfrozen, training early, middle, late, head" in line
    ]
    assert said and said[0] < next(i for i, line in enumerate(staged_lines) if "epoch 2/2" in line)
    assert staged.data.params["trainable_params"] == children["finetune"].data.params["trainable_params"]
    assert staged.data.params["lr.head"] == "0.001" and staged.data.params["lr.early"] == "2.7e-05"
    # One-cycle steps every batch: the lr logged as each epoch began is the schedule's at that step.
    steps_per_epoch = 3  # 12 training images, batch 4
    reference = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.001)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        reference,
        0.001,
        total_steps=2 * steps_per_epoch,
        pct_start=2 / 6,
        div_factor=25,
        final_div_factor=1e5,
    )
    # 6 steps in all: the warm-up takes 2 of them (0.25 x 6 would leave torch 0.5 of a step).
    expected = []
    for step in range(2 * steps_per_epoch):
        if step % steps_per_epoch == 0:
            expected.append(reference.param_groups[0]["lr"])
        reference.step()
        schedule.step()
    assert history["lr"] == pytest.approx(expected)
    assert history["lr_early"] == pytest.approx([lr * 0.3**3 for lr in expected])

    assert "| squeezenet-staged |" in result.stdout, "the leaderboard is printed at the end"
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"leaderboard.csv", "val_acc_overlay.png"} <= names, "the parent holds the comparison figure"


def test_sigterm_to_a_joblib_sweep_ends_it_killed_with_nothing_left_behind(tmp_path, tiny_folder):
    """SLURM, Kubernetes and `timeout` send SIGTERM to the whole process group."""
    import os
    import signal
    import time

    from helpers import after_first_epoch

    fast = [o for o in FAST if not o.startswith("epochs=")]
    args = ["-m", "seed=1,2,3,4", f"data.root={tiny_folder}", "data=imagefolder", "mode=scratch", *fast]
    args += ["epochs=300", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "mlflow.log_model=false"]
    with after_first_epoch(tmp_path, *args, poll=0.3) as running:
        group = running.process.pid
        os.killpg(group, signal.SIGTERM)
    assert running.process.returncode == 143, running.stderr[-3000:]
    assert "Traceback" not in running.stderr, running.stderr[-3000:]
    parent, children = parent_and_children(tmp_path)
    command = parent.data.tags.get("visiontune.resume_command", "")
    assert parent.info.status == "KILLED" and command.endswith(f"resume={parent.info.run_id}")
    assert command in running.stderr
    assert children and all(c.info.status != "RUNNING" for c in children), "nothing left RUNNING"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)  # any process of the sweep's group still alive?
        except ProcessLookupError:
            return
        time.sleep(0.5)
    raise AssertionError("a process of the sweep outlived it by 30 s")


# --- repeats, the champion gate, Ray ---------------------------------------------------------------


def test_repeats_without_m_is_a_sweep_of_seeds_ranked_by_mean_with_its_champion_gated(tmp_path, tiny_folder):
    """repeats=2 alone: one parent, a child per seed, mean ± std on the parent; the best child is the
    first champion of its name, scored on val and tagged so on its model version."""
    from mlflow.tracking import MlflowClient

    fast = [o for o in FAST if not o.startswith("num_workers=")]
    data = [f"data.root={tiny_folder}", "data=imagefolder", "num_workers=0"]
    args = ["model=squeezenet", "mode=scratch", "repeats=2", "seed=7", "mlflow.registered_model_name=ants"]
    result = run_cli(tmp_path, *data, *fast, *args)
    assert result.returncode == 0, result.stderr[-3000:]

    parent, children = parent_and_children(tmp_path)
    assert sorted(c.data.params["seed"] for c in children) == ["7", "8"]
    accuracies = [c.data.metrics["best_val_acc"] for c in children]
    assert parent.data.metrics["best_val_acc_mean"] == pytest.approx(sum(accuracies) / 2)
    assert "| 1 | squeezenet | scratch | sgd | 0.001 | 2 | 2 |" in result.stdout, "the configuration's row"
    assert " ± " in result.stdout

    client = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    version = client.get_model_version_by_alias("ants", "champion")
    assert version.run_id == parent.data.tags["best_child_run_id"]
    assert version.tags["visiontune.gate.decision"] == "crowned: no champion before it"
    assert version.tags["visiontune.gate.data"] == str(tiny_folder / "val")
    assert parent.data.tags["champion"] == "models:/ants@champion"


@pytest.mark.slow  # Ray starts its own processes: about a minute on 2 cores
def test_a_ray_sweep_on_a_local_ray_instance_is_one_parent_with_its_jobs_as_children(tmp_path, tiny_folder):
    pytest.importorskip("hydra_plugins.hydra_ray_launcher", reason='needs pip install "visiontune[ray]"')
    ray = [
        "hydra/launcher=ray_gpu",
        "hydra.launcher.ray.remote.num_gpus=0",
        "hydra.launcher.ray.remote.num_cpus=1",
    ]
    result = sweep(
        tmp_path,
        tiny_folder,
        "model=squeezenet",
        "mode=scratch",
        "seed=1,2",
        *ray,
        "+hydra.launcher.ray.init.num_cpus=2",
    )
    assert result.returncode == 0, result.stderr[-3000:]

    parent, children = parent_and_children(tmp_path)
    assert parent.info.status == "FINISHED" and len(children) == 2
    assert all(c.info.status == "FINISHED" for c in children)
    assert sorted(c.data.params["seed"] for c in children) == ["1", "2"]
    assert "Started a local Ray instance" in result.stderr
