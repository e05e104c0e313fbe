"""Runs that survive: SIGKILL and SIGTERM mid-run, then resume into the same MLflow run, exactly."""

from __future__ import annotations

import signal

import pytest
import torch

from helpers import after_first_epoch, make_image_folder, run_cli, store_runs
from visiontune import store


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # Enough images that an epoch lasts long enough to be interrupted in the middle of the run.
    return make_image_folder(tmp_path_factory.mktemp("data") / "ckpt", {"train": 16, "val": 4}, size=(96, 80))


def train_args(folder, workers: int) -> list[str]:
    data = [f"data.root={folder}", "data=imagefolder", "model.input_size=64", f"num_workers={workers}"]
    return [*data, "mode=scratch", "model=resnet", "epochs=3", "batch_size=4", "seed=7"]


def stop_after_first_epoch(cwd, args, how: int) -> tuple[int, str]:
    """Start a run, send it `how` once epoch 1 is in the store; (exit code, stderr)."""
    with after_first_epoch(cwd, *args, poll=0.05) as running:
        running.process.send_signal(how)
    return running.process.returncode, running.stderr


def history(cwd, run) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{cwd / 'outputs' / 'mlflow.db'}")
    keys = ("train_loss", "train_acc", "val_loss", "val_acc", "lr")
    return {
        k: [
            (m.step, m.value)
            for m in sorted(client.get_metric_history(run.info.run_id, k), key=lambda m: m.step)
        ]
        for k in keys
    }


def weights(cwd, run) -> dict:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{cwd / 'outputs' / 'mlflow.db'}")
    return store.load_model(f"runs:/{run.info.run_id}/model").state_dict()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, folder):
    """The same run, never stopped, decoding in this process: what a resumed one must equal.

    Each image's augmentation is seeded by (seed, epoch, index), so the worker count changes
    nothing: a resumed run with 2 workers is compared against it too.
    """
    cwd = tmp_path_factory.mktemp("whole")
    assert run_cli(cwd, *train_args(folder, 0)).returncode == 0
    (run,) = store_runs(cwd / "outputs" / "mlflow.db")
    return history(cwd, run), run.data.metrics["best_val_acc"], weights(cwd, run)


# With 2 workers the order and augmentations also cross process boundaries: the stronger case
# runs by default, the in-process one with -m slow.
@pytest.mark.parametrize("workers", [pytest.param(0, marks=pytest.mark.slow), 2])
def test_a_killed_run_resumes_into_the_same_run_and_ends_exactly_as_an_uninterrupted_one(
    tmp_path, folder, uninterrupted, workers
):
    code, stderr = stop_after_first_epoch(tmp_path, train_args(folder, workers), signal.SIGKILL)
    assert code == -signal.SIGKILL
    (killed,) = store_runs(tmp_path / "outputs" / "mlflow.db")
    assert killed.info.status == "RUNNING", "SIGKILL cannot be caught: the store still says RUNNING"
    assert len(history(tmp_path, killed)["val_acc"]) < 3, "killed before its end"

    # The ghost is found (its process is dead), listed with the command that continues it, and
    # with --mark-failed no longer shows as RUNNING; resuming works either way.
    listing = run_cli(tmp_path, *(["--mark-failed"] if workers else []), module="visiontune.commands.runs")
    assert listing.returncode == 0, listing.stderr
    assert f"{killed.info.run_id} resnet-scratch: its process" in listing.stdout
    assert f"resume with: visiontune-train resume={killed.info.run_id}" in listing.stdout
    if workers:
        assert store_runs(tmp_path / "outputs" / "mlflow.db")[0].info.status == "FAILED"
        assert "no run is left RUNNING" in run_cli(tmp_path, module="visiontune.commands.runs").stdout

    result = run_cli(tmp_path, f"resume={killed.info.run_id}")
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = store_runs(tmp_path / "outputs" / "mlflow.db")
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    expected_history, expected_best, expected_weights = uninterrupted
    assert history(tmp_path, run) == expected_history, "every step once, with the same values"
    assert [step for step, _ in expected_history["val_acc"]] == [1, 2, 3]
    assert run.data.metrics["best_val_acc"] == expected_best
    got = weights(tmp_path, run)
    assert all(torch.equal(got[k], expected_weights[k]) for k in expected_weights), "bit-identical weights"


def test_sigterm_stops_with_143_then_resume_last_continues_it(tmp_path, folder):
    import os

    from mlflow.tracking import MlflowClient

    args = [a for a in train_args(folder, 2) if not a.startswith("epochs=")] + [
        "epochs=50"
    ]  # stopped half-way
    with after_first_epoch(tmp_path, *args, poll=0.05) as running:
        live = run_cli(tmp_path, module="visiontune.commands.runs")  # a run in progress is no ghost
        twice = run_cli(tmp_path, f"resume={store_runs(tmp_path / 'outputs' / 'mlflow.db')[0].info.run_id}")
        # To the whole process group, DataLoader workers included, as `timeout` and SLURM send it.
        os.killpg(running.process.pid, signal.SIGTERM)
    code, stderr = running.process.returncode, running.stderr
    assert "no run is left RUNNING by a dead process" in live.stdout, live.stdout + live.stderr
    assert twice.returncode == 1 and "is still being trained by process" in twice.stderr, twice.stderr
    assert code == 143, stderr[-3000:]
    assert "Traceback" not in stderr
    (run,) = store_runs(tmp_path / "outputs" / "mlflow.db")
    command = f"visiontune-train resume={run.info.run_id}"
    assert run.info.status == "KILLED" and run.data.tags["visiontune.resume_command"] == command
    assert command in stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    done = len(client.get_metric_history(run.info.run_id, "val_acc"))

    refused = run_cli(tmp_path, f"resume={run.info.run_id}", "optimizer.lr=0.1")
    assert refused.returncode == 1 and "optimizer.lr differ from the run being resumed" in refused.stderr
    other_seed = [a for a in args if not a.startswith("seed=")] + ["seed=8"]
    none = run_cli(tmp_path, "resume=last", *other_seed)
    assert none.returncode == 1 and "no interrupted run of this experiment has this config" in none.stderr
    # The same config finds it; epochs may change (here: one more than were done).
    result = run_cli(tmp_path, "resume=last", *args, f"epochs={done + 1}")
    assert result.returncode == 0, result.stderr[-3000:]
    (finished,) = store_runs(tmp_path / "outputs" / "mlflow.db")
    assert finished.info.status == "FINISHED" and finished.info.run_id == run.info.run_id
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")]
    assert sorted(steps) == list(range(1, done + 2))
