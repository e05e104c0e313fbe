"""visiontune-train given bad input, as a user gives it: one line that says what is wrong and how to
fix it, exit 1, no traceback; a mistake that can be seen before training leaves no MLflow run and is
answered without importing torch."""

from __future__ import annotations

import shutil
import time

import pytest

from helpers import FAST, NO_TORCH, cli_env, make_image_folder, run_cli, store_runs


def _error_line(stderr: str) -> str:
    """The one line that says what went wrong; fails on a traceback or a second error."""
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


def _no_run(cwd) -> bool:
    store = cwd / "outputs" / "mlflow.db"
    return not store.exists() or not store_runs(store)


def _folder(tmp_path, kind: str):
    """A data folder with one mistake of `kind`, or a value of data.root that is one."""
    if kind == "wrong root":
        return tmp_path / "no" / "photos"
    if kind == "one class":
        return make_image_folder(tmp_path / "one", {"train": 3, "val": 2}, classes=("ants",))
    root = make_image_folder(tmp_path / "d", {"train": 2, "val": 2})
    if kind == "no val":
        shutil.rmtree(root / "val")
    elif kind == "empty val":
        for image in (root / "val").rglob("*.jpg"):
            image.unlink()
    elif kind == "many empty classes":  # issue 20: the error line once held every name, 1.1 MB
        for split in ("train", "val"):
            shutil.rmtree(root / split)
            for i in range(100_000):
                (root / split / f"class_{i:06d}").mkdir(parents=True)
    return root


# kind -> (extra overrides, what the error line says); {root} is the folder given as data.root.
SEEN_BEFORE_TRAINING = {
    "no root": (
        ["data=imagefolder"],
        "error: data.root is required for data=imagefolder: data.root=/path/to/folder "
        "(with train/ and val/ inside, or one folder per class)",
    ),
    "wrong root": ([], "data.root={root} does not exist"),
    "one class": ([], "{root} holds one class, 'ants' (in {root}/train): a classifier needs at least two"),
    "no val": ([], "{root}/val is missing"),
    "empty val": ([], "{root}/val has class folders ['ants', 'bees'] but no images in them"),
    "many empty classes": ([], "'class_000009' and 99,990 more] but no images in them"),
    "weights file": (
        ["mode=feature_extract", "model.weights=/no/such.pth"],
        "model.weights=/no/such.pth: no such file",
    ),
    "run dir /proc": (["hydra.run.dir=/proc"], "hydra.run.dir=/proc: cannot write in /proc"),
    "run dir in a file": (
        ["hydra.run.dir={root}/val/ants/ants_0.jpg/run"],
        "ants_0.jpg is a file, not a folder",
    ),
}


@pytest.mark.parametrize("kind", SEEN_BEFORE_TRAINING)
def test_mistakes_seen_before_training_are_one_line_and_leave_no_run(tmp_path, kind):
    """In a process that cannot import torch, in about a second, and with no run in the store."""
    root = _folder(tmp_path, kind)
    overrides, message = SEEN_BEFORE_TRAINING[kind]
    args = [f"data.root={root}", "data=imagefolder", "mode=scratch", *FAST]
    args = ["data=imagefolder", "mode=scratch", *FAST] if kind == "no root" else args
    started = time.monotonic()
    result = run_cli(
        tmp_path, *args, *(o.format(root=root) for o in overrides), env=cli_env(tmp_path) | NO_TORCH
    )
    took = time.monotonic() - started
    assert result.returncode == 1, result.stderr[-3000:]
    line = _error_line(result.stderr)
    assert message.format(root=root) in line
    assert len(line) < 600, "a list in a message is cut short"
    assert _no_run(tmp_path)
    if kind != "many empty classes":  # listing 200,000 folders takes its time
        assert took < 8, f"{took:.1f}s: answered before anything slow starts"


def test_a_sweeps_job_with_a_wrong_root_records_a_failed_child(tmp_path):
    result = run_cli(
        tmp_path, "-m", "data=imagefolder", f"data.root={tmp_path / 'nowhere'}", "mode=scratch", *FAST
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    runs = store_runs(tmp_path / "outputs" / "mlflow.db")
    (child,) = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert child.info.status == "FAILED" and "does not exist" in child.data.tags["error"]


def test_weights_of_another_architecture_fail_the_run_in_one_line(tmp_path, tiny_folder, standin_weights):
    """Telling needs torch: the run finds it, fails, and says it in one line."""
    weights = standin_weights("resnet18")
    args = [
        f"data.root={tiny_folder}",
        "data=imagefolder",
        "mode=feature_extract",
        f"model.weights={weights}",
    ]
    result = run_cli(tmp_path, *args, *FAST)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "does not fit squeezenet1_0" in _error_line(result.stderr)
    (run,) = store_runs(tmp_path / "outputs" / "mlflow.db")
    assert run.info.status == "FAILED"


# A number and a flag, one as a run and one as a sweep, by default; every pairing with -m slow.
NAMES = [
    pytest.param(typed, multirun, id=f"{typed}-{'sweep' if multirun else 'run'}", marks=marks)
    for typed in ("2024", "nan", "true")
    for multirun in (False, True)
    for marks in [() if (typed, multirun) in {("2024", False), ("true", True)} else pytest.mark.slow]
]


@pytest.mark.parametrize(("typed", "multirun"), NAMES)
def test_an_experiment_named_like_a_number_or_a_flag_keeps_the_name_typed(
    tmp_path, tiny_folder, typed, multirun
):
    sweep = ["-m"] if multirun else []
    args = [
        *sweep,
        f"data.root={tiny_folder}",
        "data=imagefolder",
        "mode=scratch",
        *FAST,
        "mlflow.log_model=false",
    ]
    result = run_cli(tmp_path, *args, f"mlflow.experiment_name={typed}")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = store_runs(tmp_path / "outputs" / "mlflow.db", experiment=typed)
    assert runs and all(r.info.status == "FINISHED" for r in runs)
    assert len(runs) == (2 if multirun else 1)  # a sweep: its parent and its one child


def test_resuming_to_fewer_epochs_than_trained_is_refused(tmp_path, tiny_folder):
    data = [
        f"data.root={tiny_folder}",
        "data=imagefolder",
        "mode=scratch",
        *FAST[1:],
        "mlflow.log_model=false",
    ]
    first = run_cli(tmp_path, *data, "epochs=2", "checkpoint.keep_after_finish=true")
    assert first.returncode == 0, first.stderr[-3000:]
    (run,) = store_runs(tmp_path / "outputs" / "mlflow.db")
    result = run_cli(tmp_path, *data, f"resume={run.info.run_id}", "epochs=1")
    assert result.returncode == 1, result.stderr[-3000:]
    line = _error_line(result.stderr)
    assert f"the run {run.info.run_id} already trained 2 epochs; epochs=1" in line
    assert "give epochs=N with N > 2" in line
    (after,) = store_runs(tmp_path / "outputs" / "mlflow.db")
    assert after.info.status == "FINISHED" and after.info.end_time == run.info.end_time, (
        "the run is untouched"
    )


def test_help_and_cfg_answer_whatever_the_run_folder(tmp_path):
    """They write no folder: an unwritable hydra.run.dir is no reason to refuse them."""
    result = run_cli(tmp_path, "hydra.run.dir=/proc", "--cfg", "job", env=cli_env(tmp_path) | NO_TORCH)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "arch: squeezenet1_0" in result.stdout
