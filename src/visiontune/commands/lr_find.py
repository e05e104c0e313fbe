"""visiontune-lr-find: the learning-rate range test on a visiontune-train config, its plot in MLflow.

A Hydra app over the same conf/ as visiontune-train (conf/lr_find.yaml adds the test's keys to
conf/train.yaml), so every group and override works as it does for training. It builds what
training would (data, model, mode, optimiser), runs lr_find.run, prints the suggested
optimizer.lr and records the curve in an MLflow run tagged visiontune.lr_find. No weights are
kept: the model and optimiser are restored, and nothing is logged as a model.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import hydra
from omegaconf import DictConfig

from visiontune import VisiontuneError, config, user_message

log = logging.getLogger("visiontune")


@hydra.main(version_base="1.3", config_path="pkg://visiontune.conf", config_name="lr_find")
def main(cfg: DictConfig) -> float | None:
    """The range test for the composed config; returns the suggested rate."""
    try:
        settings, found = config.read(cfg), config.range_test_settings(cfg)
        return find(cfg, settings, found)
    except VisiontuneError as err:
        log.error("error: %s", user_message(err))
        raise SystemExit(1) from None


def find(cfg: DictConfig, settings: config.Settings, found: config.RangeTestSettings) -> float:
    """Set up as training would, run the test inside an MLflow run, print and record what it found."""
    from visiontune import data, lr_find, pipeline, recorder, runtime, store

    job = config.Job.from_hydra(started=time.monotonic())
    where = recorder.Where.open(settings.mlflow, job.launch_dir)
    device = runtime.pick_device(settings.runtime.device)
    marks = recorder.run_tags(cfg, job) | {store.tags.LR_FIND: "true"}
    start = store.RunStart(where.experiment_id, f"lr-find {cfg.model.name}-{cfg.mode.name}", marks)
    with store.tracked_run(where.uri, start) as active:
        setup = pipeline.set_up(settings, job, device)
        store.log_params(recorder.run_params(cfg, settings, setup, device))
        test = lr_find.run(setup.training, setup.loaders["train"], found)
        data.close(setup.loaders)
        for step, (lr, loss) in enumerate(zip(test.lrs, test.losses, strict=True)):
            store.log_metrics({"lr_find_lr": lr, "lr_find_loss": loss}, step=step)
        store.log_metrics({"suggested_lr": test.suggested, "steepest_lr": test.steepest})
        store.log_figure(lr_find.figure(test), "lr_find.png")
        store.log_files(job.log_file)
    ended = "diverged and stopped" if test.diverged else "ran to its end"
    log.info(
        "range test: %d rates from %.1e, %s at %.2g; steepest descent at %.2g; MLflow run %s",
        *(len(test.lrs), found.start_lr, ended, test.lrs[-1], test.steepest, active.info.run_id),
    )
    print(f"suggested optimizer.lr={test.suggested:.2g} (the lowest smoothed loss's rate / 10)")
    return test.suggested


def cli() -> None:
    """The console script: the command line checked as visiontune-train's is, then main()."""
    args = sys.argv[1:]
    if {"-m", "--multirun"} & set(args):
        sys.exit("error: visiontune-lr-find runs one range test: drop -m/--multirun")
    os.environ.setdefault("VISIONTUNE_LAUNCH_ID", str(os.getpid()))
    try:  # its own lr_find.* keys are not in conf/train.yaml, which the check composes
        config.check_command_line([a for a in args if not a.lstrip("+~").startswith("lr_find.")])
    except VisiontuneError as err:
        sys.exit(f"error: {user_message(err)}")
    main()


if __name__ == "__main__":
    cli()
