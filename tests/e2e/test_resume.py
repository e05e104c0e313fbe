"""Runs that survive: SIGKILL and SIGTERM mid-run, then resume into the same MLflow run, exactly."""

from __future__ import annotations

import signal

import pytest
import torch

from helpers import FAST, after_first_epoch, count_in_store, make_image_folder, run_cli, store_runs
from visiontune import store


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # Enough images that an epoch lasts long enough to be interrupted in the middle of the run.
    return make_image_folder(tmp_path_factory.mktemp("data") / "ckpt", {"train": 16, "val": 4}, size=(96, 80))


def train_args(folder, workers: int) -> list[str]:
    data = [f"data.root={folder}", "data=imagefolder", "model.input_size=64", f"num_workers={workers}"]
    # ema.decay: the weights' moving average resumes exactly too (val_acc_ema, the model it may become).
    return [*data, "ema.decay=0.9", "mode=scratch", "model=resnet", "epochs=3", "batch_size=4", "seed=7"]


def stop_after_first_epoch(cwd, args, how: int) -> tuple[int, str]:
    """Start a run, send it `how` once epoch 1 is in the store; (exit code, stderr)."""
    with after_first_epoch(cwd, *args, poll=0.05) as running:
        running.process.send_signal(how)
    return running.process.returncode, running.stderr


def history(cwd, run) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{cwd / 'outputs' / 'mlflow.db'}")
    keys = ("train_loss", "train_acc", "val_loss", "val_acc", "val_acc_ema", "lr")
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


# SIGTERM's exit code and resume command, resume=last and a refused key run by default in the tests
# below (interrupted again and again; killed before its first checkpoint; another group); -m slow.
@pytest.mark.slow
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


# --- interrupted again and again; resumes that must be refused (issue 18) ------------------------


def epochs_logged(store) -> int:
    """How many epochs the store's runs have logged together (val_acc values: one per run and epoch)."""
    return count_in_store(store, "SELECT COUNT(*) FROM metrics WHERE key = 'val_acc'")


def stopped_after(cwd, args, epochs: int, prefix=(), how=signal.SIGTERM) -> tuple[int, str]:
    """visiontune-train `args` in `cwd` (after a `prefix` command), its process group sent `how`
    once the store holds `epochs` epochs (of all its runs) (SIGTERM: as SLURM or `timeout` stop a job); (exit code, stderr)."""
    import os
    import subprocess
    import sys
    import time

    from helpers import cli_env

    command = [*prefix, sys.executable, "-m", "visiontune.train", *args]
    store = cwd / "outputs" / "mlflow.db"
    with subprocess.Popen(
        command,
        cwd=cwd,
        env=cli_env(cwd),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as process:
        deadline = time.monotonic() + 180
        while epochs_logged(store) < epochs and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(process.pid, how)
        return process.wait(timeout=120), process.stderr.read()


def slow_args(folder, epochs: int = 6) -> list[str]:
    # A rate so small that no epoch improves on the first: the best weights are epoch 1's, from
    # before every interruption.
    return [*train_args(folder, 0)[:-1], f"epochs={epochs}", "optimizer.lr=1e-12"]


def test_interrupted_again_and_again_it_still_finishes_with_its_best_weights(tmp_path, folder):
    store = tmp_path / "outputs" / "mlflow.db"
    assert stopped_after(tmp_path, slow_args(folder), 2)[0] == 143
    (run,) = store_runs(store)
    resume = f"resume={run.info.run_id}"
    # The second attempt writes checkpoints of its own (epoch 3); the third writes none before it
    # is stopped (every 5 epochs), and must leave the run resumable all the same.
    assert stopped_after(tmp_path, [resume], 3)[0] == 143
    code, stderr = stopped_after(tmp_path, [resume, "checkpoint.every_epochs=5"], 4)
    assert code == 143 and f"continue it with: visiontune-train {resume}" in stderr, stderr[-2000:]

    result = run_cli(tmp_path, resume)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = store_runs(store)
    assert run.info.status == "FINISHED" and run.data.metrics["best_epoch"] == 1
    assert "visiontune.resume_command" not in run.data.tags, "a finished run has nothing to resume"
    from mlflow.tracking import MlflowClient

    steps = [
        m.step for m in MlflowClient(f"sqlite:///{store}").get_metric_history(run.info.run_id, "val_acc")
    ]
    assert sorted(steps) == [1, 2, 3, 4, 5, 6], "every epoch logged once"
    assert weights(tmp_path, run), "its model loads"
    assert not list((tmp_path / "outputs" / "runs").rglob("*.pt*")), "no attempt's checkpoint is left behind"


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, folder):
    """A launch folder holding one run stopped with SIGTERM after its first epoch."""
    cwd = tmp_path_factory.mktemp("stopped")
    assert stopped_after(cwd, slow_args(folder, epochs=3), 1)[0] == 143
    (run,) = store_runs(cwd / "outputs" / "mlflow.db")
    return cwd, run


@pytest.mark.parametrize(
    "group",
    [
        "model=alexnet",
        *(pytest.param(g, marks=pytest.mark.slow) for g in ("optimizer=adam", "mode=finetune")),
    ],
)
def test_a_resume_that_chooses_another_group_is_refused(stopped, group):
    cwd, run = stopped
    refused = run_cli(cwd, f"resume={run.info.run_id}", group)
    assert refused.returncode == 1, refused.stderr[-2000:]
    assert f"resume: {group.split('=')[0]} differ from the run being resumed" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_a_checkpoint_that_would_instantiate_anything_else_is_not_resumed(stopped, tmp_path):
    cwd, run = stopped
    (saved,) = (cwd / "outputs").rglob("last.pt")
    state = torch.load(saved, weights_only=True)
    marker = tmp_path / "pwned"
    state["config"]["optimizer._target_"] = "os.system"
    state["config"]["optimizer.command"] = f"touch {marker}"
    crafted = tmp_path / "crafted"
    crafted.mkdir()
    torch.save(state, crafted / "last.pt")
    refused = run_cli(cwd, f"resume={crafted}")
    assert refused.returncode == 1 and "optimizer._target_=os.system" in refused.stderr, refused.stderr[
        -2000:
    ]
    assert not marker.exists()


def test_a_checkpoint_of_a_run_this_store_lacks_is_one_line(stopped, tmp_path):
    _, run = stopped
    (saved,) = (stopped[0] / "outputs").rglob("last.pt")
    refused = run_cli(tmp_path, f"resume={saved.parent}")  # another launch folder: another store
    assert refused.returncode == 1 and "which this store does not hold" in refused.stderr
    assert "Traceback" not in refused.stderr and run.info.run_id in refused.stderr


def test_two_resumes_of_one_run_at_once_train_it_once(tmp_path, folder):
    import subprocess
    import sys

    from helpers import cli_env

    assert stopped_after(tmp_path, slow_args(folder, epochs=3), 1)[0] == 143
    (run,) = store_runs(tmp_path / "outputs" / "mlflow.db")
    command = [sys.executable, "-m", "visiontune.train", f"resume={run.info.run_id}"]
    launched = [
        subprocess.Popen(command, cwd=tmp_path, env=cli_env(tmp_path), stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = sorted((p.wait(timeout=300), p.stderr.read()) for p in launched)
    (ok, _), (refused, why) = results
    assert (ok, refused) == (0, 1), results
    assert "is being trained by another process" in why or "is still being trained by process" in why
    from mlflow.tracking import MlflowClient

    history = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}").get_metric_history(
        run.info.run_id, "val_acc"
    )
    assert sorted(m.step for m in history) == [1, 2, 3], "each epoch logged once"


def test_finishing_removes_only_the_checkpoints_it_wrote(tmp_path, tiny_folder):
    project = tmp_path / "project"
    (project / "checkpoints").mkdir(parents=True)
    (project / "checkpoints" / "mine.ckpt").write_text("a user's own file")
    args = ["data=imagefolder", f"data.root={tiny_folder}", "mode=scratch", *FAST, f"hydra.run.dir={project}"]
    result = run_cli(tmp_path, *args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (project / "checkpoints" / "mine.ckpt").read_text() == "a user's own file"
    assert not list((project / "checkpoints").glob("*.pt"))


def _can_unshare() -> bool:
    import shutil
    import subprocess

    if shutil.which("unshare") is None:
        return False
    return (
        subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True).returncode
        == 0
    )


@pytest.mark.skipif(not _can_unshare(), reason="needs unshare --pid --fork --mount-proc (Linux, as root)")
def test_a_run_killed_in_a_container_resumes_from_the_restarted_container(tmp_path, folder):
    """A restarted container keeps its hostname and starts its process at the same pid: the
    resuming process must not take the dead trainer's tag for itself, alive."""
    container = ["unshare", "--pid", "--fork", "--mount-proc"]
    code, _ = stopped_after(tmp_path, slow_args(folder, epochs=3), 1, container, signal.SIGKILL)
    assert code != 0
    (run,) = store_runs(tmp_path / "outputs" / "mlflow.db")
    assert run.info.status == "RUNNING", "killed -9: the store still says RUNNING"
    listing = run_cli(tmp_path, module="visiontune.commands.runs")
    assert run.info.run_id in listing.stdout, "visiontune-runs lists the dead run"
    import subprocess
    import sys

    from helpers import cli_env

    again = subprocess.run(
        [*container, sys.executable, "-m", "visiontune.train", f"resume={run.info.run_id}"],
        cwd=tmp_path,
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert store_runs(tmp_path / "outputs" / "mlflow.db")[0].info.status == "FINISHED"


def _small_files_only(limit: int):
    """For a child process: files may grow to `limit` bytes, as on a disk that is nearly full."""
    import resource

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past it then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_checkpoint_that_cannot_be_written_stops_the_run_killed_in_one_line(tmp_path, folder):
    import subprocess
    import sys

    from helpers import cli_env

    # resnet18's checkpoint (weights and momentum) is about 90 MB; the store stays far below 20 MB.
    result = subprocess.run(
        [sys.executable, "-m", "visiontune.train", *train_args(folder, 0)],
        cwd=tmp_path,
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_small_files_only(20 * 2**20),
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "could not write the checkpoint" in result.stderr and "/checkpoints/" in result.stderr
    assert "Traceback" not in result.stderr
    (run,) = store_runs(tmp_path / "outputs" / "mlflow.db")
    assert run.info.status == "KILLED"
    assert not list((tmp_path / "outputs" / "runs").rglob("*.partial")), (
        "no half-written file keeps the disk full"
    )


def test_a_run_killed_before_its_first_checkpoint_is_not_offered_for_resuming(tmp_path, folder):
    """resume=last passes over it to the newest run that can continue; resume=<its id> says why not."""
    store = tmp_path / "outputs" / "mlflow.db"
    args = slow_args(folder, epochs=3)
    assert stopped_after(tmp_path, args, 1)[0] == 143  # the older run: a checkpoint after epoch 1
    (older,) = store_runs(store)
    code, _ = stopped_after(tmp_path, [*args, "checkpoint.every_epochs=5"], 2, how=signal.SIGKILL)
    assert code == -signal.SIGKILL
    newer = next(r for r in store_runs(store) if r.info.run_id != older.info.run_id)
    assert "visiontune.checkpoint" not in newer.data.tags, "no checkpoint, no tag pointing at one"

    refused = run_cli(tmp_path, f"resume={newer.info.run_id}")
    assert refused.returncode == 1 and "has no checkpoint to continue" in refused.stderr, refused.stderr[
        -2000:
    ]
    listing = run_cli(tmp_path, module="visiontune.commands.runs").stdout
    assert newer.info.run_id in listing and f"resume={newer.info.run_id}" not in listing
    result = run_cli(tmp_path, "resume=last", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    statuses = {r.info.run_id: r.info.status for r in store_runs(store)}
    assert statuses[older.info.run_id] == "FINISHED" and statuses[newer.info.run_id] == "RUNNING"
