"""visiontune-train end to end, as a user runs it: the real CLI, real images, a real SQLite store."""

from __future__ import annotations

import shutil

import pytest

from conftest import FAST, SHARED_DATA, interrupt_once_training, make_image_folder, run_cli, store_runs


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_folder):
    """A launch directory whose store already holds one good run, as a user's would."""
    cwd = tmp_path_factory.mktemp("launch")
    result = run_cli(
        cwd, f"data.root={tiny_folder}", "data=imagefolder", "mode=scratch", *FAST[1:], "epochs=2"
    )
    assert result.returncode == 0, result.stderr[-3000:]
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

    from visiontune import data

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
    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model").eval()
    _, samples = data.find_samples(tiny_folder)
    settings = data.LoaderSettings(input_size=64, batch_size=100, num_workers=0, seed=0)
    images, labels = next(iter(data.build_loaders(samples, settings)["val"]))
    images = data.Normalizer(torch.device("cpu"))(images)
    with torch.no_grad():
        accuracy = (model(images).argmax(1) == labels).float().mean().item()
    assert accuracy == pytest.approx(best)


BAD_INPUTS = {
    "missing root": (["data.root=/nonexistent/photos"], "data.root=/nonexistent/photos does not exist"),
    "epochs": (["epochs=0"], "epochs=0 must be a positive number"),
    "batch size": (["batch_size=-2"], "batch_size=-2 must be a positive number"),
    "lr": (["optimizer.lr=0"], "optimizer.lr=0 must be a positive number"),
    "weights file": (["mode=feature_extract", "model.weights=/no/such.pth"], "no such file"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_fails_clearly_and_keeps_the_store(workspace, tiny_folder, case):
    overrides, message = BAD_INPUTS[case]
    before = snapshot(workspace)
    result = run_cli(
        workspace, f"data.root={tiny_folder}", "data=imagefolder", "mode=scratch", *FAST, *overrides
    )
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
    assert "Traceback" not in result.stderr + result.stdout
    after = snapshot(workspace)
    assert {k: after[k] for k in before} == before, "earlier runs are untouched"
    (failed,) = [after[k] for k in after.keys() - before.keys()]
    assert failed[0] == "FAILED"
    (new_run,) = [r for r in store_runs(workspace / "outputs" / "mlflow.db") if r.info.run_id not in before]
    assert message in new_run.data.tags["error"]


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
    return root


FOLDER_PROBLEMS = {
    "no val": "val is missing",
    "classes": "different class folders",
    "empty": "no images",
    "corrupt": "bad.jpg",
}


@pytest.mark.parametrize("kind", FOLDER_PROBLEMS)
def test_bad_folder_fails_clearly_and_keeps_the_store(workspace, tmp_path, kind):
    root = _broken_folder(tmp_path, kind)
    before = snapshot(workspace)
    result = run_cli(workspace, f"data.root={root}", "data=imagefolder", "mode=scratch", *FAST)
    assert result.returncode != 0
    assert FOLDER_PROBLEMS[kind] in result.stderr
    assert "Traceback" not in result.stderr
    after = snapshot(workspace)
    assert {k: after[k] for k in before} == before
    assert [after[k][0] for k in after.keys() - before.keys()] == ["FAILED"]


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
    from conftest import cli_env, offline_env

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


def test_cli_starts_without_importing_torch_or_mlflow():
    """--help, --cfg and config errors answer without paying for torch and mlflow imports."""
    import subprocess
    import sys

    code = (
        "import sys, visiontune.cli, visiontune.sweep; print(sorted({'torch', 'mlflow'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
