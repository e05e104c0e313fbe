"""visiontune-train end to end, as a user runs it: the real CLI, real images, a real SQLite store.
Also crops rendered on the device, deterministic runs, and a process with loader workers exiting."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from helpers import (
    FAST,
    NO_TORCH,
    SHARED_DATA,
    cli_env,
    interrupt_once_training,
    make_image_folder,
    run_cli,
    store_runs,
)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_folder):
    """A launch directory whose store already holds one good run, as a user's would."""
    cwd = tmp_path_factory.mktemp("launch")
    result = run_cli(
        cwd, f"data.root={tiny_folder}", "data=imagefolder", "mode=scratch", *FAST[1:], "epochs=2"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = store_runs(cwd / "outputs" / "mlflow.db")
    # What a user reads at the end: the run and its model, and no MLflow chatter about tables.
    assert f"MLflow run {run.info.run_id} FINISHED; its model: runs:/{run.info.run_id}/model" in result.stderr
    assert "database tables" not in result.stderr
    return cwd


def snapshot(cwd):
    """What MLflow holds for every run: status, params, metrics, tags (minus end-time noise)."""
    return {
        r.info.run_id: (r.info.status, r.data.params, r.data.metrics)
        for r in store_runs(cwd / "outputs" / "mlflow.db")
    }


def test_run_records_params_metrics_and_a_loadable_model(workspace, tiny_folder):
    import mlflow
    import torch

    from visiontune import data, store

    (run,) = store_runs(workspace / "outputs" / "mlflow.db")
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "squeezenet-scratch"
    assert run.data.tags["model"] == "squeezenet" and run.data.tags["mode"] == "scratch"
    params = run.data.params
    assert params["model.name"] == "squeezenet" and params["mode.name"] == "scratch"
    assert params["optimizer.name"] == "sgd" and float(params["optimizer.lr"]) == 0.001
    assert params["batch_size"] == "4" and params["epochs"] == "2" and params["seed"] == "42"
    assert params["data.root"] == str(tiny_folder) and params["model.weights"] == "None"
    assert int(params["trainable_params"]) == int(params["total_params"]) > 700_000
    assert params["num_classes"] == "2"

    client = mlflow.MlflowClient(f"sqlite:///{workspace / 'outputs' / 'mlflow.db'}")
    for metric in ("train_loss", "train_acc", "val_loss", "val_acc", "epoch_seconds"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, metric)] == [1, 2], metric
    best = run.data.metrics["best_val_acc"]
    assert best == max(m.value for m in client.get_metric_history(run.info.run_id, "val_acc"))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"hydra", "val_acc.png", "train.log"} <= artifacts
    hydra_files = {a.path for a in client.list_artifacts(run.info.run_id, "hydra")}
    assert {"hydra/config.yaml", "hydra/overrides.yaml"} <= hydra_files

    # The logged model is the best model: evaluated on the val folder it scores best_val_acc.
    mlflow.set_tracking_uri(f"sqlite:///{workspace / 'outputs' / 'mlflow.db'}")
    model = store.load_model(f"runs:/{run.info.run_id}/model").eval()
    _, samples = data.find_samples(tiny_folder)
    settings = data.LoaderSettings(input_size=64, batch_size=100, num_workers=0, seed=0)
    images, labels = next(iter(data.build_loaders(samples, settings)["val"]))
    images = data.Normalizer(torch.device("cpu"))(images)
    with torch.no_grad():
        accuracy = (model(images).argmax(1) == labels).float().mean().item()
    assert accuracy == pytest.approx(best)


def test_start_up_to_the_first_training_batch_is_recorded(tmp_path, tiny_folder):
    """startup_seconds: from the process's start (imports included) to the first batch; not a speed test."""
    import re
    import time
    from datetime import datetime

    import mlflow

    args = [f"data.root={tiny_folder}", "data=imagefolder", "mode=scratch", *FAST, "mlflow.log_model=false"]
    launched = time.monotonic()
    result = run_cli(tmp_path, *args)
    wall = time.monotonic() - launched
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = store_runs(tmp_path / "outputs" / "mlflow.db")
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    (metric,) = client.get_metric_history(run.info.run_id, "startup_seconds")
    assert metric.step == 1
    assert 0 < metric.value < wall
    # Counted from the process's start, not from the pipeline's: Hydra named the run's folder (after
    # the process started) before torch and MLflow were imported and the MLflow run began (before
    # the first batch), so start-up lasted at least from that name's time to the run's start.
    (folder,) = (tmp_path / "outputs" / "runs").glob("*/*")
    named = datetime.strptime(f"{folder.parent.name} {folder.name.rsplit('-', 1)[0]}", "%Y-%m-%d %H-%M-%S-%f")
    assert metric.value > run.info.start_time / 1000 - named.timestamp() - 0.01  # ms in MLflow
    printed = re.search(
        r"start-up: ([\d.]+)s from the process's start to the first training batch", result.stderr
    )
    assert printed and float(printed.group(1)) == pytest.approx(metric.value, abs=0.05)


# Found in the run (reading headers, comparing splits): the run is recorded FAILED, with the reason.
# What the CLI sees before a run exists (a missing root, val/ or weights file) leaves no run:
# tests/e2e/test_bad_input.py.
BAD_INPUTS = {
    "classes": "different class folders",
    "corrupt": "cannot be read, e.g.",
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_fails_clearly_and_keeps_the_store(workspace, tmp_path, case):
    message = BAD_INPUTS[case]
    root = _broken_folder(tmp_path, case)
    before = snapshot(workspace)
    result = run_cli(workspace, f"data.root={root}", "data=imagefolder", "mode=scratch", *FAST)
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
    assert "Traceback" not in result.stderr + result.stdout
    after = snapshot(workspace)
    assert {k: after[k] for k in before} == before, "earlier runs are untouched"
    (failed,) = [after[k] for k in after.keys() - before.keys()]
    assert failed[0] == "FAILED"
    (new_run,) = [r for r in store_runs(workspace / "outputs" / "mlflow.db") if r.info.run_id not in before]
    assert message in new_run.data.tags["error"]
    assert f"MLflow run {new_run.info.run_id} FAILED" in result.stderr


CONFIG_MISTAKES = {
    "epochs=0": "epochs=0 must be a positive whole number, e.g. epochs=15",
    "epochs=2.5": "epochs=2.5 must be a positive whole number",
    "batch_size=4.5": "batch_size=4.5 must be a positive whole number",
    "batch_size=-2": "batch_size=-2 must be a positive whole number",
    "optimizer.lr=0": "optimizer.lr=0 must be a positive number",
    "optimizer.lr='0.001'": "optimizer.lr='0.001' is a string",
    "device=gpu": "device=gpu is not a device: use auto, cpu, cuda, cuda:N or mps",
    "precision=fp8": "precision=fp8 must be one of auto, off, bf16, fp16",
    "epoch=3": "unknown key epoch; did you mean epochs?",
    "lr=0.01": "unknown key lr; did you mean optimizer.lr?",
    "data.root=/data/café": """'data.root="/data/café"'""",
    "data.root=/data/a&b": """'data.root="/data/a&b"'""",
}


@pytest.mark.parametrize("override", CONFIG_MISTAKES)
def test_config_mistakes_are_one_line_and_record_nothing(workspace, tiny_folder, override):
    """Caught from the config alone: no run in the store, no torch imported, about a second."""
    before = snapshot(workspace)
    data = [f"data.root={tiny_folder}", "data=imagefolder"]
    result = run_cli(workspace, *data, "mode=scratch", *FAST, override, env=cli_env(workspace) | NO_TORCH)
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and CONFIG_MISTAKES[override] in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert snapshot(workspace) == before, "no FAILED run for a typo"


def test_a_quoted_root_with_non_ascii_letters_trains(tmp_path, tiny_folder):
    """The form the error message advises works."""
    root = tmp_path / "café & co"
    shutil.copytree(tiny_folder, root)
    result = run_cli(tmp_path, f'data.root="{root}"', "data=imagefolder", "mode=scratch", *FAST)
    assert result.returncode == 0, result.stderr[-2000:]
    (run,) = store_runs(tmp_path / "outputs" / "mlflow.db")
    assert run.data.params["data.root"] == str(root)


def _broken_folder(tmp_path, kind):
    root = make_image_folder(tmp_path / "broken", {"train": 2, "val": 2})
    if kind == "no val":
        shutil.rmtree(root / "val")
    elif kind == "classes":
        shutil.rmtree(root / "val" / "bees")
        make_image_folder(root, {"val": 1}, classes=("wasps",))
    elif kind == "empty":
        for f in (root / "train").rglob("*.jpg"):
            f.unlink()
    elif kind == "corrupt":
        (root / "val" / "bees" / "bad.jpg").write_bytes(b"\x00" * 100)
    elif kind == "truncated":  # the header parses, the pixels do not: found only when decoding
        good = next((root / "train" / "ants").glob("*.jpg"))
        whole = good.read_bytes()
        (root / "train" / "ants" / "cut.jpg").write_bytes(whole[: whole.index(b"\xff\xda") + 20])
    return root


# kind -> (what the error says, the status of the run it leaves: none where the layout shows it).
# Folders found wrong only inside the run (other classes, a corrupt image) are BAD_INPUTS above.
FOLDER_PROBLEMS = {
    "no val": ("val is missing", []),
    "empty": ("no images", []),
}


@pytest.mark.parametrize("kind", FOLDER_PROBLEMS)
def test_bad_folder_fails_clearly_and_keeps_the_store(workspace, tmp_path, kind):
    root = _broken_folder(tmp_path, kind)
    message, recorded = FOLDER_PROBLEMS[kind]
    before = snapshot(workspace)
    result = run_cli(workspace, f"data.root={root}", "data=imagefolder", "mode=scratch", *FAST)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    after = snapshot(workspace)
    assert {k: after[k] for k in before} == before
    assert [after[k][0] for k in after.keys() - before.keys()] == recorded


def test_skip_bad_images_trains_without_them(workspace, tmp_path):
    root = _broken_folder(tmp_path, "corrupt")
    before = snapshot(workspace)
    result = run_cli(
        workspace, f"data.root={root}", "data=imagefolder", "mode=scratch", "data.skip_bad_images=true", *FAST
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (new,) = [r for r in store_runs(workspace / "outputs" / "mlflow.db") if r.info.run_id not in before]
    assert new.info.status == "FINISHED"
    assert new.data.params["skipped_images"] == "1" and new.data.params["val_images"] == "4"
    assert new.data.metrics["skipped_images"] == 1


def test_images_that_fail_only_at_decode_are_counted_as_skipped(workspace, tmp_path):
    root = _broken_folder(tmp_path, "truncated")
    before = snapshot(workspace)
    data = [f"data.root={root}", "data=imagefolder", "data.skip_bad_images=true"]
    result = run_cli(workspace, *data, "mode=scratch", *FAST)
    assert result.returncode == 0, result.stderr[-2000:]
    (new,) = [r for r in store_runs(workspace / "outputs" / "mlflow.db") if r.info.run_id not in before]
    assert new.data.params["skipped_images"] == "0", "its header is fine"
    assert new.data.metrics["skipped_images"] == 1, "counted when it failed to decode"


@pytest.mark.parametrize("group", ["model", "mode", "data", "optimizer"])
def test_unknown_group_option_lists_the_choices(tmp_path, group):
    result = run_cli(tmp_path, f"{group}=nonsense")
    assert result.returncode != 0
    assert f"Could not find '{group}/nonsense'" in result.stderr
    assert f"Available options in '{group}'" in result.stderr
    assert not (tmp_path / "outputs" / "mlflow.db").exists()


def test_feature_extract_from_a_weights_file_trains_only_the_head(tmp_path, tiny_folder, standin_weights):
    weights = standin_weights("resnet18")
    result = run_cli(
        tmp_path,
        "model=resnet",
        "mode=feature_extract",
        f"model.weights={weights}",
        f"data.root={tiny_folder}",
        "data=imagefolder",
        *FAST,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (run,) = store_runs(tmp_path / "outputs" / "mlflow.db")
    assert run.data.params["trainable_params"] == "1026"
    assert run.data.params["model.weights"] == str(weights)


def test_ctrl_c_marks_the_run_killed(tmp_path, tiny_folder):
    args = [f"data.root={tiny_folder}", "data=imagefolder", "mode=scratch", *FAST[1:], "epochs=500"]
    returncode, stderr = interrupt_once_training(tmp_path, *args)
    assert returncode == 130, stderr[-2000:]
    assert "interrupted" in stderr
    (run,) = store_runs(tmp_path / "outputs" / "mlflow.db")
    assert run.info.status == "KILLED"


@pytest.mark.parametrize("value", ["-1", "many"])
def test_num_workers_must_be_auto_or_a_count(tmp_path, tiny_folder, value):
    args = [o for o in FAST if not o.startswith("num_workers")]
    result = run_cli(
        tmp_path,
        f"data.root={tiny_folder}",
        "data=imagefolder",
        "mode=scratch",
        *args,
        f"num_workers={value}",
    )
    assert result.returncode == 1
    assert f"num_workers={value} must be auto or a whole number" in result.stderr


@pytest.mark.slow
@pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason="the shared hymenoptera copy is not beside this checkout"
)
def test_tutorial_data_at_full_size(tmp_path):
    """Issue 2's first acceptance command, on the real 244 + 153 images at 224 px."""
    result = run_cli(tmp_path, f"data.root={SHARED_DATA}", "mode=scratch", "epochs=2")
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = store_runs(tmp_path / "outputs" / "mlflow.db")
    assert run.info.status == "FINISHED"
    assert (run.data.params["train_images"], run.data.params["val_images"]) == ("244", "153")


def test_pretrained_weights_unavailable_offline(workspace, tiny_folder):
    """The default weights with no network (a closed localhost port as proxy): one clear message."""
    from helpers import cli_env, offline_env

    env = offline_env(cli_env(workspace))
    before = snapshot(workspace)
    result = run_cli(
        workspace,
        f"data.root={tiny_folder}",
        "data=imagefolder",
        "model=resnet",
        "mode=finetune",
        *FAST,
        env=env,
    )
    assert result.returncode == 1
    assert "could not load pretrained weights ResNet18_Weights.IMAGENET1K_V1 for resnet18" in result.stderr
    assert "resnet18-f37072fd.pth" in result.stderr and "model.weights=PATH" in result.stderr
    assert "Traceback" not in result.stderr
    after = snapshot(workspace)
    assert {k: after[k] for k in before} == before
    assert [after[k][0] for k in after.keys() - before.keys()] == ["FAILED"]


def test_unusable_tracking_uri(tmp_path, tiny_folder):
    result = run_cli(
        tmp_path,
        f"data.root={tiny_folder}",
        "data=imagefolder",
        "mode=scratch",
        *FAST,
        "mlflow.tracking_uri=foo://bar",
    )
    assert result.returncode == 1
    assert "cannot use the MLflow store mlflow.tracking_uri=foo://bar" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "printed"),
    [(["--help"], "model=resnet mode=finetune"), (["--cfg", "job", "model=resnet"], "arch: resnet18")],
    ids=["help", "cfg"],
)
def test_help_and_cfg_answer_without_torch(tmp_path, args, printed):
    """visiontune-train --help and --cfg print and leave, in a process where importing torch fails."""
    result = run_cli(tmp_path, *args, env=cli_env(tmp_path) | NO_TORCH)
    assert result.returncode == 0, result.stderr[-3000:]
    assert printed in result.stdout
    assert not (tmp_path / "outputs" / "mlflow.db").exists()


def test_cli_starts_without_importing_torch_or_mlflow():
    """--help, --cfg and config errors of every command answer without paying for torch and mlflow."""
    import subprocess
    import sys

    commands = "predict, evaluate, export, compare, runs, ui"
    code = (
        f"import sys; from visiontune import train, sweep; from visiontune.commands import {commands}; "
        "print(sorted({'torch', 'mlflow'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.slow  # waits out the store's two-minute retry window in part; unwritable stores run by default
def test_a_store_locked_mid_run_never_records_the_run_as_finished(tmp_path, tiny_folder):
    """Another program holds the SQLite file past MLflow's 20 s wait: FAILED once it lets go."""
    import sqlite3
    import time

    from helpers import after_first_epoch

    args = [f"data.root={tiny_folder}", "data=imagefolder", "mode=scratch", *FAST[1:], "epochs=500"]
    store = tmp_path / "outputs" / "mlflow.db"
    with after_first_epoch(tmp_path, *args, poll=0.2) as running:
        holder = sqlite3.connect(store, timeout=30, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        time.sleep(25)  # past MLflow's 20 s busy timeout: the next write fails
        holder.execute("ROLLBACK")
        holder.close()
    stderr = running.stderr
    assert running.process.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "database is locked" in errors[0] and str(store) in errors[0], stderr[-2000:]
    (run,) = store_runs(store)
    assert run.info.status == "FAILED" and "database is locked" in run.data.tags["error"]


@pytest.mark.slow  # four trainings at once (26 s); -m slow runs it
def test_four_launches_in_the_same_second_keep_their_own_folders(tmp_path, tiny_folder):
    import subprocess
    import sys

    args = [f"data.root={tiny_folder}", "data=imagefolder", "mode=scratch", *FAST, "mlflow.log_model=false"]
    launches = [
        subprocess.Popen(
            [sys.executable, "-m", "visiontune.train", *args, f"seed={seed}"],
            **{"cwd": tmp_path, "env": cli_env(tmp_path), "stderr": subprocess.PIPE, "text": True},
        )
        for seed in (1, 2, 3, 4)
    ]
    errors = [launch.communicate(timeout=300)[1] for launch in launches]
    assert [launch.returncode for launch in launches] == [0, 0, 0, 0], errors
    runs = store_runs(tmp_path / "outputs" / "mlflow.db")
    assert len(runs) == 4
    assert len(list((tmp_path / "outputs" / "runs").glob("*/*"))) == 4, "a folder each"
    for run in runs:
        seed = run.data.params["seed"]
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
        config = Path(client.download_artifacts(run.info.run_id, "hydra/config.yaml")).read_text()
        assert f"seed: {seed}\n" in config, "the logged config is this run's own"
        log = Path(client.download_artifacts(run.info.run_id, "train.log")).read_text()
        assert log.count("best val acc") == 1, "the log holds this run alone"


def _immutable(path: Path) -> bool:
    """chattr +i: even root cannot write it (file permissions do not stop root)."""
    import subprocess

    return subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0


@pytest.fixture
def immutable():
    import subprocess

    marked: list[Path] = []

    def mark(path: Path) -> None:
        if not _immutable(path):
            pytest.skip("this file system has no immutable flag (chattr +i)")
        marked.append(path)

    yield mark
    for path in marked:
        subprocess.run(["chattr", "-i", str(path)], check=False)


@pytest.mark.parametrize("what", ["store", "artifacts"])
def test_an_unwritable_store_is_one_line_and_loses_nothing(tmp_path, tiny_folder, immutable, what):
    from visiontune import store

    # A store holding a finished run, made here: a training run would add 10 s to set it up.
    outputs = tmp_path / "outputs"
    uri = f"sqlite:///{outputs / 'mlflow.db'}"
    with store.tracked_run(uri, store.RunStart(store.ensure_experiment(uri, "visiontune"), "earlier", {})):
        store.log_params({"seed": 1})
        store.log_metrics({"best_val_acc": 0.5})
    before = snapshot(tmp_path)
    assert len(before) == 1
    immutable(outputs / "mlflow.db" if what == "store" else outputs / "mlartifacts")
    args = [f"data.root={tiny_folder}", "data=imagefolder", "mode=scratch", *FAST, "mlflow.log_model=false"]
    result = run_cli(tmp_path, *args)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr[-3000:]
    named = outputs / "mlflow.db" if what == "store" else outputs / "mlartifacts"
    assert str(named) in errors[0], errors
    assert snapshot(tmp_path) == before


@pytest.mark.slow  # one warning line, for a whole training run (20 s)
def test_scratch_says_it_does_not_use_the_weights_given(tmp_path, tiny_folder, standin_weights):
    args = [f"data.root={tiny_folder}", "data=imagefolder", "mode=scratch", *FAST, "mlflow.log_model=false"]
    result = run_cli(tmp_path, *args, f"model.weights={standin_weights('squeezenet1_0')}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "mode=scratch starts from random weights: the model.weights given is not used" in result.stderr


def test_credentials_in_the_tracking_uri_are_never_recorded_or_printed(tmp_path, tiny_folder):
    """A real `mlflow server` on localhost, reached through a URI that carries a password."""
    import sys

    from mlflow.tracking import MlflowClient

    from helpers import background_server, free_port

    port, server_dir = free_port(), tmp_path / "server"
    server_dir.mkdir()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--backend-store-uri", f"sqlite:///{server_dir / 'mlflow.db'}", "--workers", "1"]
    command += ["--artifacts-destination", str(server_dir / "artifacts")]
    env = cli_env(tmp_path) | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    data = [f"data.root={tiny_folder}", "data=imagefolder", "mode=scratch", *FAST, "mlflow.log_model=false"]
    with background_server(command, server_dir, env, f"http://127.0.0.1:{port}/health", tmp_path / "log"):
        result = run_cli(tmp_path, *data, f"mlflow.tracking_uri=http://alice:s3cr3t@127.0.0.1:{port}")
        assert result.returncode == 0, result.stderr[-3000:]
        client = MlflowClient(f"http://127.0.0.1:{port}")
        (run,) = client.search_runs([client.get_experiment_by_name("visiontune").experiment_id])
        logged = [client.download_artifacts(run.info.run_id, p) for p in ("hydra", "train.log")]
        texts = [
            p.read_text()
            for path in logged
            for p in ([Path(path)] if Path(path).is_file() else Path(path).iterdir())
        ]
    # Hydra writes the config and overrides as typed into the run's folder: redacted there too.
    local = [p.read_text() for p in (tmp_path / "outputs" / "runs").rglob("*.yaml")]
    assert local, "the run's .hydra/ files"
    recorded = [result.stdout, result.stderr, str(run.data.tags), str(run.data.params), *texts, *local]
    assert not [text for text in recorded if "s3cr3t" in text]
    assert run.data.tags["mlflow.tracking_uri"] == f"http://alice:***@127.0.0.1:{port}"
    assert any("alice:***@" in text for text in texts), (
        "the logged config says which server, not how to log in"
    )


def test_a_diverging_run_fails_in_one_line_and_logs_no_model(workspace, tiny_folder):
    before = snapshot(workspace)
    data = [f"data.root={tiny_folder}", "data=imagefolder"]
    result = run_cli(workspace, *data, "mode=scratch", *FAST[1:], "epochs=3", "optimizer.lr=1e4")
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "lower optimizer.lr (it is 10000)" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    after = snapshot(workspace)
    assert {k: after[k] for k in before} == before
    (new,) = [r for r in store_runs(workspace / "outputs" / "mlflow.db") if r.info.run_id not in before]
    assert new.info.status == "FAILED" and "best_val_acc" not in new.data.metrics
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workspace / 'outputs' / 'mlflow.db'}")
    assert "model" not in {a.path for a in client.list_artifacts(new.info.run_id)}


def test_inception_trains_when_the_last_training_batch_would_hold_one_image(tmp_path):
    root = make_image_folder(tmp_path / "odd", {"train": 5, "val": 1})  # 10 training images
    args = [f"data.root={root}", "data=imagefolder", "model=inception", "mode=scratch", "epochs=1"]
    result = run_cli(tmp_path, *args, "batch_size=3", "num_workers=0", "mlflow.log_model=false")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the last training batch would hold 1 image(s)" in result.stderr
    (run,) = store_runs(tmp_path / "outputs" / "mlflow.db")
    assert run.info.status == "FINISHED"


def test_fine_tune_a_logged_model_on_data_with_more_classes(workspace, tmp_path):
    """model.weights=runs:/<id>/model: the 2-class run's backbone, a new 3-class head."""
    import mlflow
    import torch

    from visiontune import store

    # The workspace's first run: FINISHED, with its model logged (later tests add other runs).
    source = min(store_runs(workspace / "outputs" / "mlflow.db"), key=lambda r: r.info.start_time)
    three = make_image_folder(tmp_path / "three", {"train": 3, "val": 2}, classes=("ants", "bees", "wasps"))
    before = snapshot(workspace)
    args = [f"data.root={three}", "data=imagefolder", "mode=feature_extract", *FAST]
    result = run_cli(workspace, *args, f"model.weights=runs:/{source.info.run_id}/model")
    assert result.returncode == 0, result.stderr[-3000:]
    (new,) = [r for r in store_runs(workspace / "outputs" / "mlflow.db") if r.info.run_id not in before]
    assert new.data.params["num_classes"] == "3"
    assert new.data.params["model.weights"] == f"runs:/{source.info.run_id}/model"
    mlflow.set_tracking_uri(f"sqlite:///{workspace / 'outputs' / 'mlflow.db'}")
    old = store.load_model(f"runs:/{source.info.run_id}/model").state_dict()
    tuned = store.load_model(f"runs:/{new.info.run_id}/model").state_dict()
    assert tuned["classifier.1.weight"].shape[0] == 3
    backbone = [k for k in old if not k.startswith("classifier.1.")]
    assert all(torch.equal(old[k], tuned[k]) for k in backbone), "the frozen backbone is the logged one"

    wrong = run_cli(workspace, *args, "model=resnet", f"model.weights=runs:/{source.info.run_id}/model")
    assert wrong.returncode == 1 and "is not a resnet18 model" in wrong.stderr


def test_a_frozen_backbone_on_larger_batches_gives_the_same_run(tmp_path, tiny_folder, standin_weights):
    """backbone_batch_size only changes how many images the frozen backbone takes at once: every
    logged loss and accuracy is the same, dropout in squeezenet's frozen classifier included."""
    weights = standin_weights("squeezenet1_0")
    histories = []
    for images in (4, 12):
        cwd = tmp_path / str(images)
        cwd.mkdir()
        result = run_cli(
            cwd, f"data.root={tiny_folder}", "data=imagefolder", f"model.weights={weights}", *FAST[1:],
            "epochs=2", "precision=off", "channels_last=false", f"backbone_batch_size={images}",
            "mlflow.log_model=false",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"frozen backbone: {images // 4} batch(es) per pass in training" in result.stderr
        (run,) = store_runs(cwd / "outputs" / "mlflow.db")
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{cwd / 'outputs' / 'mlflow.db'}")
        histories.append(
            {
                key: [
                    m.value
                    for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
                ]
                for key in ("train_loss", "train_acc", "val_loss", "val_acc")
            }
        )
    assert len(histories[0]["train_loss"]) == 2
    assert histories[0] == histories[1]


def test_a_run_trains_with_crops_rendered_on_the_device(tmp_path):
    """End to end on a CPU (true: on any device), a data worker sending the crop batches, a policy
    and random erasing drawn with them."""
    # Larger than the cap (2 x 64), and data.cache_mb=0: the worker decodes and shrinks them.
    folder = make_image_folder(tmp_path / "data", {"train": 5, "val": 3}, size=(300, 200))
    args = ["data=imagefolder", f"data.root={folder}", "mode=scratch", "device=cpu", "data.gpu_augment=true"]
    args += ["augment=trivialaugment", "augment.random_erasing=0.5"]
    fast = [o for o in FAST if not o.startswith(("epochs", "num_workers"))]
    result = run_cli(
        tmp_path, *args, *fast, "epochs=1", "num_workers=1", "data.cache_mb=0", "mlflow.log_model=false"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    expected = "crop, flip, trivialaugment, random erasing p=0.5: drawn in the data workers, rendered on cpu"
    assert f"training augmentation: {expected} (data.gpu_augment=true)" in result.stderr
    (run,) = store_runs(tmp_path / "outputs" / "mlflow.db")
    assert run.info.status == "FINISHED" and run.data.params["data.gpu_augment"] == "True"
    assert math.isfinite(run.data.metrics["train_loss"])


def test_a_bad_value_on_the_command_line_is_one_line(tmp_path, tiny_folder):
    data_args = ["data=imagefolder", f"data.root={tiny_folder}"]
    bad = "data.gpu_augment=maybe"
    result = run_cli(tmp_path, *data_args, "mode=scratch", *FAST, bad, env=cli_env(tmp_path) | NO_TORCH)
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "data.gpu_augment=maybe must be auto" in errors[0], result.stderr
    assert not (tmp_path / "outputs" / "mlflow.db").exists() or not store_runs(
        tmp_path / "outputs" / "mlflow.db"
    )


def test_a_process_holding_loader_workers_still_exits(tiny_folder):
    """Workers ignore SIGTERM (the main process stops them); multiprocessing's exit hook sends
    exactly that and then waits: a script, notebook or test run holding a loader must not hang."""
    import subprocess
    import sys

    code = (
        "import sys; from pathlib import Path; from visiontune import data\n"
        "classes, samples = data.find_samples(Path(sys.argv[1]))\n"
        "loader = data.build_loaders(samples, data.LoaderSettings(32, 2, num_workers=2, seed=0))['train']\n"
        "next(iter(loader)); held = loader\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tiny_folder)], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()[-2000:]


def test_two_deterministic_runs_log_identical_metrics(tmp_path, tiny_folder):
    data = ("data=imagefolder", f"data.root={tiny_folder}", *(o for o in FAST if not o.startswith("epochs")))
    args = (
        "model=squeezenet",
        "mode=scratch",
        "epochs=2",
        "deterministic=true",
        "mlflow.log_model=false",
        *data,
    )
    for _ in range(2):
        result = run_cli(tmp_path, *args)
        assert result.returncode == 0, result.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    runs = store_runs(tmp_path / "outputs" / "mlflow.db")
    assert len(runs) == 2 and all(r.data.params["deterministic"] == "True" for r in runs)
    client = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    keys = ("train_loss", "train_acc", "val_loss", "val_acc")
    first, second = (
        {k: [m.value for m in client.get_metric_history(r.info.run_id, k)] for k in keys} for r in runs
    )
    assert first == second and len(first["train_loss"]) == 2
    assert {"version.torch", "version.visiontune", "data.train_digest"} <= set(runs[0].data.params)
