"""The training loop's options end to end: EMA and early stopping in a recorded run; visiontune-lr-find."""

from __future__ import annotations

from helpers import FAST, run_cli, store_runs


def test_a_run_with_ema_stops_early_finished_with_its_tag(tmp_path, tiny_folder, standin_weights):
    """A frozen squeezenet at a rate too small to move: val accuracy is flat from epoch 1, so
    patience 2 ends the 10 epochs after epoch 3, FINISHED, with the tag saying when and why."""
    result = run_cli(
        tmp_path,
        "model=squeezenet",
        "mode=feature_extract",
        f"model.weights={standin_weights('squeezenet1_0')}",
        f"data.root={tiny_folder}",
        "data=imagefolder",
        *FAST[1:],
        "epochs=10",
        "optimizer.lr=1e-12",
        "ema.decay=0.9",
        "early_stopping.patience=2",
        "accumulate_batches=2",
        "clip_grad_norm=1.0",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = store_runs(tmp_path / "outputs" / "mlflow.db")
    assert run.info.status == "FINISHED"
    tag = run.data.tags["visiontune.early_stopped"]
    assert tag.startswith("early stopping after epoch 3 of 10: val accuracy did not improve"), tag
    assert tag in result.stderr
    assert {"val_acc", "val_acc_ema", "val_loss_ema"} <= set(run.data.metrics)
    assert run.data.tags["visiontune.best_weights"] in ("weights", "ema")
    assert run.data.metrics["best_epoch"] == 1
    assert "top5" not in " ".join(run.data.metrics), "two classes: no top-5 accuracy"


def test_lr_find_prints_a_rate_and_logs_its_curve_and_plot_but_no_model(tmp_path, tiny_folder):
    result = run_cli(
        tmp_path,
        "model=squeezenet",
        "mode=scratch",
        f"data.root={tiny_folder}",
        "data=imagefolder",
        *FAST[1:],
        "lr_find.steps=12",
        module="visiontune.commands.lr_find",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = store_runs(tmp_path / "outputs" / "mlflow.db")
    suggested = run.data.metrics["suggested_lr"]
    assert f"suggested optimizer.lr={suggested:.2g}" in result.stdout
    assert run.info.status == "FINISHED" and run.data.tags["visiontune.lr_find"] == "true"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert "lr_find.png" in files and "model" not in files
    assert len(client.get_metric_history(run.info.run_id, "lr_find_loss")) >= 2
    assert 1e-7 < suggested < 10
