"""model=torchvision and model=timm as a user runs them: runs named by architecture,
whose logged models predict their runs' accuracy; visiontune-models lists names."""

from __future__ import annotations

import csv

import pytest

from helpers import FAST, NO_TORCH, cli_env, run_cli, store_runs


def test_found_models_train_named_by_arch_and_their_logged_models_predict_the_runs_accuracy(
    tmp_path, tiny_folder
):
    import torch

    from visiontune import catalog, models

    torch.manual_seed(0)
    weights = {"mobilenet_v3_small": tmp_path / "mnv3.pt", "resnet10t": tmp_path / "r10t.pt"}
    torch.save(models.tv_models.get_model("mobilenet_v3_small").state_dict(), weights["mobilenet_v3_small"])
    torch.save(catalog.timm().create_model("resnet10t").state_dict(), weights["resnet10t"])
    data = ["data=imagefolder", f"data.root={tiny_folder}", "mode=feature_extract"]
    for source, arch in (("torchvision", "mobilenet_v3_small"), ("timm", "resnet10t")):
        args = (f"model={source}", f"model.arch={arch}", f"model.weights={weights[arch]}", *data, *FAST)
        result = run_cli(tmp_path, *args)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"{arch}: head " in result.stderr and "layer groups early:" in result.stderr
    runs = {r.info.run_name: r for r in store_runs(tmp_path / "outputs" / "mlflow.db")}
    assert set(runs) == {"mobilenet_v3_small-feature_extract", "resnet10t-feature_extract"}
    tv_run = runs["mobilenet_v3_small-feature_extract"]
    assert tv_run.info.status == "FINISHED" and tv_run.data.params["model.head"] == "classifier.3"
    assert runs["resnet10t-feature_extract"].data.params["model.head"] == "fc"
    for run in runs.values():
        out = tmp_path / f"{run.info.run_id}.csv"
        val = str(tiny_folder / "val")
        args = (f"runs:/{run.info.run_id}/model", val, "--out", str(out), "--num-workers", "0")
        result = run_cli(tmp_path, *args, module="visiontune.commands.predict")
        assert result.returncode == 0, result.stderr[-2000:]
        rows = list(csv.DictReader(out.open()))
        accuracy = sum(r["class"] in r["path"].split("/")[-2] for r in rows) / len(rows)
        assert accuracy == pytest.approx(run.data.metrics["best_val_acc"], abs=1e-9)


def test_visiontune_models_lists_names_by_source_and_pattern(tmp_path):
    result = run_cli(
        tmp_path,
        "--source",
        "torchvision",
        "--source",
        "timm",
        "--filter",
        "convnext_[at]*",
        module="visiontune.commands.models",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "model=torchvision model.arch=convnext_tiny" in lines
    assert "model=timm model.arch=convnext_atto" in lines
    assert all("convnext_" in line for line in lines)


def test_visiontune_models_help_and_presets_need_no_torch(tmp_path):
    env = cli_env(tmp_path) | NO_TORCH
    result = run_cli(tmp_path, "--help", module="visiontune.commands.models", env=env)
    assert result.returncode == 0 and "--filter" in result.stdout, result.stderr
    result = run_cli(
        tmp_path, "--source", "presets", "--filter", "res*", module="visiontune.commands.models", env=env
    )
    assert result.returncode == 0 and result.stdout.splitlines() == ["model=resnet"], result.stderr
