"""sweep.py in this process: swept keys, the summary callback on a real store, launcher presets and
the notes and refusals a sweep gives before any job starts. Sweeps run end to end:
tests/e2e/test_sweep.py and tests/e2e/test_scaling.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from visiontune.sweep import swept_keys


def test_swept_keys_are_the_ones_with_several_values():
    overrides = ["model=resnet,vgg", "epochs=1", "optimizer.lr=range(0.1,0.3,0.1)", "mode=scratch"]
    assert swept_keys(overrides) == ["model", "optimizer.lr"]
    search = {"optimizer.lr": "tag(log, interval(1e-5, 1e-1))", "batch_size": "choice(4, 8)", "seed": "1"}
    assert swept_keys(["model=resnet,vgg"], search) == ["optimizer.lr", "batch_size", "model"]
    assert swept_keys(["batch_size=16"], search) == ["optimizer.lr"], "a fixed value on the command line wins"


def test_a_summary_that_cannot_be_written_fails_the_parent_with_one_message(tmp_path, capsys):
    """The real callback on a real store whose parent's artifact folder is taken by a file."""
    from mlflow.tracking import MlflowClient

    from visiontune import store
    from visiontune.sweep import MlflowSweep

    uri = store.tracking_uri(None, tmp_path)
    parent = store.ParentRun.start(uri, store.ensure_experiment(uri, "visiontune"), "sweep-x", {})
    artifacts = MlflowClient(uri).get_run(parent.run_id).info.artifact_uri.removeprefix("file://")
    Path(artifacts).parent.mkdir(parents=True)
    Path(artifacts).write_text("a file where the parent's artifacts belong")
    callback = MlflowSweep()
    callback.parent = parent
    with pytest.raises(SystemExit) as stopped:
        callback.on_multirun_end(config=None)
    assert stopped.value.code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "the sweep's summary could not be written" in errors[0], errors
    ended = MlflowClient(uri).get_run(parent.run_id)
    assert ended.info.status == "FAILED" and "summary could not be written" in ended.data.tags["error"]


# --- SLURM sweeps, tried with submitit_local -----------------------------------------------------


@pytest.mark.parametrize(("preset", "target"), [("slurm", "SlurmLauncher"), ("local", "LocalLauncher")])
def test_launcher_presets_extend_the_plugins_with_gpus_asked_for_and_a_longer_time(preset, target):
    with initialize_config_module(config_module="visiontune.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra/launcher={preset}"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith(f"submitit_launcher.{target}")
    assert launcher.gpus_per_node == 1, "submitit_local would hide the GPUs; SLURM would give none"
    assert launcher.timeout_min == 720, "submitit's 60-minute default stops most training jobs"


def test_a_missing_submitit_plugin_is_one_line_naming_the_extra(monkeypatch, capsys):
    import importlib.util

    from visiontune import train

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if "submitit" in name else real(name))
    monkeypatch.setattr(sys, "argv", ["visiontune-train", "-m", "hydra/launcher=slurm", "seed=1,2"])
    with pytest.raises(SystemExit) as stopped:
        train.cli()
    assert stopped.value.code == (
        'error: hydra/launcher=slurm needs a Hydra plugin that is not installed: pip install "visiontune[slurm]"'
    )


@pytest.mark.parametrize(
    ("launcher", "gpus_per_node", "warned"),
    [("submitit_local", None, True), ("local", 1, False), ("slurm", 1, False), ("joblib", None, False)],
)
def test_a_local_sweep_on_a_gpu_machine_says_when_its_jobs_would_get_no_gpu(
    monkeypatch, tmp_path, launcher, gpus_per_node, warned
):
    from visiontune import sweep

    monkeypatch.setattr(sweep, "_has_nvidia_gpus", lambda: True)
    with initialize_config_module(config_module="visiontune.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    sweep_dir = tmp_path / cfg.hydra.sweep.dir
    notes = sweep.launcher_notes(cfg.hydra.launcher, tmp_path, sweep_dir)
    assert cfg.hydra.launcher.get("gpus_per_node") == gpus_per_node
    assert any("hides this machine's GPUs" in note for note in notes) == warned
    if launcher != "joblib":  # submitit's jobs write their consoles to files: the sweep says where
        assert f"{sweep_dir}/.submitit/<job id>/<job id>_0_log.err" in notes[0], notes[0]
        assert f"its log to {sweep_dir}/<job number>/train.log" in notes[0], notes[0]


def test_a_slurm_sweep_where_there_is_no_slurm_stops_before_anything_is_recorded(tmp_path, monkeypatch):
    import shutil

    from visiontune import train

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(sys, "argv", ["visiontune-train", "-m", "hydra/launcher=slurm", "seed=1,2"])
    with pytest.raises(SystemExit) as stopped:
        train.cli()
    assert "hydra/launcher=slurm submits each job with SLURM's sbatch" in str(stopped.value.code)
    assert "hydra/launcher=local" in str(stopped.value.code), "says how to try it here"
    assert not (tmp_path / "outputs").exists()


# --- repeats=N and data.folds=K: seeds and folds as axes of the sweep ------------------------------


@pytest.mark.parametrize(
    ("given", "expanded"),
    [
        (["-m", "model=resnet,vgg", "repeats=3"], ["-m", "model=resnet,vgg", "repeats=3", "seed=42,43,44"]),
        (["repeats=2", "seed=7"], ["-m", "repeats=2", "seed=7,8"]),  # no -m: a sweep of its own
        (["repeats=2", "--info", "searchpath"], ["-m", "repeats=2", "seed=42,43", "--info", "searchpath"]),
        (["-m", "data.folds=3"], ["-m", "data.folds=3", "data.fold=0,1,2"]),
        (["repeats=2", "data.folds=2"], ["-m", "repeats=2", "seed=42,43", "data.folds=2", "data.fold=0,1"]),
        (["data.folds=5", "data.fold=2"], ["data.folds=5", "data.fold=2"]),  # one fold, trained alone
        (["repeats=1", "model=resnet"], ["repeats=1", "model=resnet"]),
        # a resumed sweep's command lists what repeats= expanded to: it is left as it is
        (["-m", "repeats=2", "seed=42,43", "resume=abc"], ["-m", "repeats=2", "seed=42,43", "resume=abc"]),
    ],
)
def test_repeats_and_folds_become_seed_and_fold_axes_of_a_sweep(given, expanded):
    from visiontune.sweep import expand_repeats

    assert expand_repeats(given) == expanded


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (
            ["repeats=3", "seed=1,2"],
            "repeats=3 sweeps seed over 1,2,3, but the command line also sweeps seed=1,2",
        ),
        (["repeats=2", "seed=range(1,3)"], "but the command line also sweeps seed=range(1,3)"),
        (["repeats=0"], "repeats=0 must be 1 or more"),
        (["repeats=two"], "repeats=two must be a whole number"),
        (["-m", "search=optuna", "repeats=2"], "search=optuna's sampler would read as choices"),
    ],
)
def test_repeats_that_cannot_expand_are_refused_in_one_line(given, message, monkeypatch, capsys):
    from visiontune import train

    monkeypatch.setattr(sys, "argv", ["visiontune-train", *given])
    with pytest.raises(SystemExit) as stopped:
        train.cli()
    assert message in str(stopped.value.code) and "\n" not in str(stopped.value.code)


# --- Ray ------------------------------------------------------------------------------------------


def test_the_ray_preset_asks_for_a_gpu_per_job():
    pytest.importorskip("hydra_plugins.hydra_ray_launcher", reason='needs pip install "visiontune[ray]"')
    with initialize_config_module(config_module="visiontune.conf", version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=ray_gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("hydra_ray_launcher.ray_launcher.RayLauncher")
    assert launcher.ray.remote.num_gpus == 1 and launcher.ray.init.address is None


@pytest.mark.parametrize(
    ("address", "gpus", "has_gpus", "refused"),
    [
        (None, 1, False, True),  # a local Ray without GPUs would never start a job asking for one
        (None, 0, False, False),
        (None, 1, True, False),
        ("auto", 1, False, False),  # a cluster's GPUs are elsewhere
    ],
)
def test_a_ray_sweep_whose_jobs_could_never_start_is_refused_first(address, gpus, has_gpus, refused):
    from omegaconf import OmegaConf

    from visiontune import VisiontuneError
    from visiontune.sweep import check_ray

    launcher = OmegaConf.create(
        {
            "_target_": "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher",
            "ray": {"init": {"address": address}, "remote": {"num_gpus": gpus}},
        }
    )
    if refused:
        with pytest.raises(VisiontuneError, match="num_gpus=1: each job asks Ray for a GPU"):
            check_ray(launcher, has_gpus)
    else:
        check_ray(launcher, has_gpus)
