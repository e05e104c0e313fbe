"""visiontune-search end to end: real worker processes, a journal file, a SQLite MLflow store, pruning,
a worker killed with SIGKILL, a second command joining the study."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import cli_env, count_in_store, run_cli, store_runs

# The learning rate decides everything on the tiny folder: 0.05 and 0.02 reach val acc 1.0 by the
# second epoch, 1e-6 stays where it started, so the median pruner stops a 1e-6 trial at epoch 2
# once trials that learn have completed.
PRUNING = (
    "~search.space.batch_size",
    "~search.space.optimizer.lr",
    "+search.space.optimizer.lr={type: categorical, choices: [0.05, 0.02, 1e-6]}",
    "search.sampler=random",
    "search.seed=0",
    "search.startup_trials=1",
    "search.warmup_epochs=0",
)


def tiny_search(tiny_folder, weights) -> list[str]:
    return [
        "search=basic",
        *("model=resnet", "data=imagefolder", f"data.root={tiny_folder}", f"model.weights={weights}"),
        *("epochs=3", "num_workers=0", "model.input_size=32", "batch_size=4", "mlflow.log_model=false"),
        *PRUNING,
    ]


def study_of(cwd: Path):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    (journal,) = (cwd / "outputs" / "search").glob("*/journal.log")
    return optuna.load_study(study_name=None, storage=JournalStorage(JournalFileBackend(str(journal))))


def parent_and_children(cwd: Path):
    runs = store_runs(cwd / "outputs" / "mlflow.db")
    (parent,) = [r for r in runs if r.data.tags.get("visiontune.sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 1 + len(children), "every trial is a child of the study's parent"
    return parent, children


def artifacts(cwd: Path, run_id: str) -> set[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{cwd / 'outputs' / 'mlflow.db'}")
    return {f.path for folder in ("", "optuna") for f in client.list_artifacts(run_id, folder or None)}


def assert_every_trial_once(cwd: Path, trials: int) -> None:
    """One child per trial, each FINISHED and tagged with its Optuna state; every epoch logged once."""
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    parent, children = parent_and_children(cwd)
    assert parent.info.status == "FINISHED"
    assert len(children) == trials
    assert {c.info.status for c in children} == {"FINISHED"}
    states = {c.data.tags["optuna.state"] for c in children}
    assert states <= {"COMPLETE", "PRUNED"}
    client = MlflowClient(f"sqlite:///{cwd / 'outputs' / 'mlflow.db'}")
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_acc")]
        assert steps == sorted(set(steps)), f"{child.info.run_name}: an epoch logged twice: {steps}"
    ended = [t for t in study_of(cwd).trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(ended) == trials
    assert {t.user_attrs["mlflow.run_id"] for t in ended} == {c.info.run_id for c in children}


def test_two_workers_prune_losing_trials_each_trial_a_child_run(tmp_path, tiny_folder, standin_weights):
    from mlflow.tracking import MlflowClient

    args = tiny_search(tiny_folder, standin_weights("resnet18"))
    result = run_cli(tmp_path, *args, "--workers", "2", "--trials", "6", module="visiontune.search.command")
    assert result.returncode == 0, result.stderr[-3000:]

    assert_every_trial_once(tmp_path, 6)
    parent, children = parent_and_children(tmp_path)
    pruned = [c for c in children if c.data.tags["optuna.state"] == "PRUNED"]
    assert pruned, "a trial lagging the completed ones at an epoch is pruned"
    trials = {t.user_attrs["mlflow.run_id"]: t for t in study_of(tmp_path).trials if t.state.name == "PRUNED"}
    client = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    for child in pruned:  # FINISHED where it was stopped, with the epochs it trained
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_acc")]
        assert steps == sorted(trials[child.info.run_id].intermediate_values)
        assert child.data.metrics["best_epoch"] in steps
    assert any(len(client.get_metric_history(c.info.run_id, "val_acc")) < 3 for c in pruned)
    assert int(parent.data.tags["optuna.pruned"]) == len(pruned)
    assert parent.data.metrics["best_val_acc"] == 1.0
    shown = artifacts(tmp_path, parent.info.run_id)
    assert {"leaderboard.md", "val_acc_overlay.png"} <= shown
    assert {"optuna/optimization_history.png", "optuna/parallel_coordinate.png", "optuna/trials.csv"} <= shown


def start_search(cwd: Path, *args: str) -> subprocess.Popen:
    """visiontune-search in the background, in a session of its own (as a terminal starts it)."""
    command = [sys.executable, "-m", "visiontune.search.command", *args]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "text": True}
    return subprocess.Popen(command, cwd=cwd, env=cli_env(cwd), start_new_session=True, **quiet)


def wait_for(condition, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


@pytest.mark.slow
def test_a_worker_killed_mid_trial_its_trial_continues_from_its_checkpoint(
    tmp_path, tiny_folder, standin_weights
):
    args = [*tiny_search(tiny_folder, standin_weights("resnet18")), "--workers", "2", "--trials", "4"]
    store = tmp_path / "outputs" / "mlflow.db"
    main = start_search(tmp_path, *args)
    try:
        wait_for(lambda: count_in_store(store, "SELECT COUNT(*) FROM metrics WHERE key = 'val_acc'") > 0)
        (checkpoint,) = list((tmp_path / "outputs" / "search").glob("*/*/checkpoints/last.pt"))[:1]
        killed = int(checkpoint.parents[1].name)  # the trial whose first epoch is in its checkpoint
        (trial,) = [t for t in study_of(tmp_path).trials if t.number == killed]
        pid = int(trial.user_attrs["visiontune.process"].rpartition(":")[2].partition("@")[0])
        os.kill(pid, signal.SIGKILL)
        main.communicate(timeout=600)
    finally:
        main.kill()
    result = run_cli(tmp_path, *args, module="visiontune.search.command")  # the same command again
    assert result.returncode == 0, result.stderr[-3000:]

    assert_every_trial_once(tmp_path, 4)
    failed = [t for t in study_of(tmp_path).trials if t.state.name == "FAIL"]
    assert [t.number for t in failed] == [killed], "the killed trial alone was re-queued"
    retried = [t for t in study_of(tmp_path).trials if t.user_attrs.get("visiontune.trial") == killed]
    assert len(retried) == 2 and retried[1].params == retried[0].params
    _, children = parent_and_children(tmp_path)
    (resumed,) = [c for c in children if c.data.tags.get("search.trial") == str(killed)]
    assert (tmp_path / "outputs" / "search").glob(f"*/{killed}/train.log")
    assert "resuming MLflow run" in "".join(
        p.read_text() for p in (tmp_path / "outputs" / "search").glob(f"*/{killed}/train.log")
    ), f"trial {killed} ({resumed.info.run_id}) continued from its checkpoint"


@pytest.mark.slow
def test_a_second_command_started_later_joins_the_study(tmp_path, tiny_folder, standin_weights):
    args = [*tiny_search(tiny_folder, standin_weights("resnet18")), "--workers", "1", "--trials", "4"]
    store = tmp_path / "outputs" / "mlflow.db"
    first = start_search(tmp_path, *args)
    try:
        wait_for(lambda: count_in_store(store, "SELECT COUNT(*) FROM metrics WHERE key = 'val_acc'") > 0)
        second = run_cli(tmp_path, *args, module="visiontune.search.command")
        first.communicate(timeout=600)
    finally:
        first.kill()
    assert second.returncode == 0 and first.returncode == 0, second.stderr[-3000:]

    assert_every_trial_once(tmp_path, 4)
    processes = {t.user_attrs["visiontune.process"] for t in study_of(tmp_path).trials}
    assert len(processes) == 2, "both commands' workers took trials from the one study"
