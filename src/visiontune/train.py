"""visiontune-train: @hydra.main -> run(cfg), the only place that sees the whole config.

Heavy libraries (torch, torchvision, mlflow) are imported inside run(), so that --help,
--cfg and config errors answer at once.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from visiontune import VisiontuneError, user_message

log = logging.getLogger("visiontune")

PRECISIONS = {"off": None, "bf16": "bfloat16", "fp16": "float16"}


@hydra.main(version_base="1.3", config_path="pkg://visiontune.conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Train one configuration; returns its best validation accuracy (for sweepers)."""
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        return run(cfg)
    except VisiontuneError as err:
        log.error("error: %s", user_message(err))
        if multirun:  # the sweep goes on; the job's MLflow run is already FAILED
            return None
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        log.error("interrupted: the MLflow run is marked KILLED")
        raise SystemExit(130) from None
    except Exception:
        if not multirun:
            raise
        log.exception("job failed")
        return None


def run(cfg: DictConfig) -> float:
    from visiontune import tracking

    hydra_cfg = HydraConfig.get()
    launch_dir = Path(hydra_cfg.runtime.cwd)
    choices = hydra_cfg.runtime.choices
    uri = tracking.tracking_uri(cfg.mlflow.tracking_uri, launch_dir)
    experiment_id = tracking.ensure_experiment(uri, cfg.mlflow.experiment_name)
    parent, varied = None, []
    if hydra_cfg.mode == RunMode.MULTIRUN:
        parent, varied = tracking.read_sweep(launch_dir / hydra_cfg.sweep.dir)
    tags = run_tags(cfg, choices, hydra_cfg.overrides.task)
    run_name = f"{cfg.model.name}-{cfg.mode.name}"
    if set(varied) - {"model", "mode"}:  # seeds, lrs, Optuna trials: Hydra's job number tells them apart
        run_name += f" #{hydra_cfg.job.num}"
    with tracking.tracked_run(uri, experiment_id, run_name, tags, parent):
        import mlflow

        mlflow.log_artifacts(str(Path(hydra_cfg.runtime.output_dir) / ".hydra"), "hydra")
        try:
            return train(cfg, launch_dir)
        finally:
            log_file = Path(hydra_cfg.runtime.output_dir) / f"{hydra_cfg.job.name}.log"
            if log_file.is_file():
                mlflow.log_artifact(str(log_file))


def run_tags(cfg: DictConfig, choices, task_overrides) -> dict[str, str]:
    """Tags to filter and group by in the UI: the groups, the lr, and every overridden key."""
    tags = {
        "model": choices.model,
        "mode": choices.mode,
        "data": choices.data,
        "optimizer": choices.optimizer,
        "scheduler": choices.scheduler,
        "lr": str(cfg.optimizer.lr),
    }
    for override in task_overrides:
        key, _, value = override.partition("=")
        # MLflow tag keys allow letters, digits, _ - . / and spaces; `model@x` or `+key` do not fit.
        tags[re.sub(r"[^\w\-./ ]", "_", key.lstrip("+~"))] = value[:5000]
    return tags


def check_numbers(cfg: DictConfig) -> None:
    """Reject values no training can use, naming the key and the fix."""
    positive = {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "optimizer.lr": cfg.optimizer.lr}
    for key, value in positive.items():
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            raise VisiontuneError(f"{key}={value} must be a positive number, e.g. {key}={_example(key)}")
    minimum = cfg.model.get("min_input_size", 1)
    if cfg.model.input_size < minimum:
        raise VisiontuneError(
            f"model.input_size={cfg.model.input_size} is too small for {cfg.model.name}: it needs at least "
            f"{minimum} px (model.input_size={minimum})"
        )
    if cfg.num_workers != "auto" and (not isinstance(cfg.num_workers, int) or cfg.num_workers < 0):
        raise VisiontuneError(f"num_workers={cfg.num_workers} must be auto or a whole number, 0 or more")
    if str(cfg.precision) not in PRECISIONS:
        raise VisiontuneError(f"precision={cfg.precision} must be one of {', '.join(PRECISIONS)}")
    if cfg.mode.pretrained and cfg.model.weights is None:
        raise VisiontuneError(
            f"mode={cfg.mode.name} starts from pretrained weights but model.weights is null: "
            f"set model.weights=DEFAULT or a state-dict path, or use mode=scratch"
        )


def _example(key: str) -> str:
    return {"epochs": "15", "batch_size": "8", "optimizer.lr": "0.001"}[key]


def worker_count(requested) -> int:
    if requested != "auto":
        return requested
    return min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def pick_device(requested: str):
    import torch

    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise VisiontuneError(f"device={requested} but this machine has no CUDA GPU: use device=auto or cpu")
    return device


def train(cfg: DictConfig, launch_dir: Path) -> float:
    """Data, model, optimizer, the epoch loop and what MLflow keeps of it."""
    import mlflow
    import torch
    from hydra.utils import instantiate

    from visiontune import data, engine, models, plots, tracking

    check_numbers(cfg)
    device = pick_device(str(cfg.device))
    root, classes, samples, skipped = load_data(cfg.data, launch_dir)
    torch.manual_seed(cfg.seed)
    model, frozen_norms, weights = load_model(cfg.model, cfg.mode, len(classes), launch_dir)
    trainable, total = models.count_parameters(model)
    log_params(cfg, {
        "data.root": str(root), "model.weights": weights, "num_classes": len(classes),
        "classes": ",".join(classes), "train_images": len(samples["train"]),
        "val_images": len(samples["val"]), "skipped_images": skipped,
        "trainable_params": trainable, "total_params": total, "device_used": str(device),
    })  # fmt: skip
    log.info(
        "%s %s on %s: %d classes, %d train / %d val images, %s of %s parameters train",
        cfg.model.name, cfg.mode.name, device, len(classes), len(samples["train"]),
        len(samples["val"]), f"{trainable:,}", f"{total:,}",
    )  # fmt: skip

    amp_name = PRECISIONS[str(cfg.precision)]
    amp_dtype = getattr(torch, amp_name) if amp_name else None
    runtime = engine.Runtime(device, data.Normalizer(device), amp_dtype, cfg.channels_last)
    model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    optimizer = instantiate(cfg.optimizer)(params=[p for p in model.parameters() if p.requires_grad])
    scheduler = instantiate(cfg.scheduler)(optimizer=optimizer) if cfg.scheduler else None
    loaders = data.build_loaders(
        samples, cfg.model.input_size, cfg.batch_size, worker_count(cfg.num_workers), cfg.seed,
        device.type == "cuda", cfg.data.skip_bad_images,
    )  # fmt: skip
    # Work done once instead of every epoch: with a frozen backbone in eval mode, the head's
    # inputs for the val split; otherwise the decoded val images (their transform is fixed).
    budget = cfg.data.replay_val_mb * 2**20
    trunk = None
    if not cfg.mode.train_backbone and cfg.mode.freeze_norm_stats:
        trunk = engine.FrozenTrunk(model, cfg.model.heads[0], budget)
    elif data.replay_bytes(len(samples["val"]), cfg.model.input_size) <= budget:
        loaders["val"] = data.ReplayLoader(loaders["val"])

    result = engine.fit(
        model, loaders, torch.nn.CrossEntropyLoss(), optimizer, scheduler, runtime,
        torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16), cfg.epochs,
        cfg.model.aux_loss_weight, frozen_norms, trunk, on_epoch=_epoch_logger(cfg.epochs),
    )  # fmt: skip

    tracking.log_metrics({"best_val_acc": result.best_acc, "best_epoch": result.best_epoch})
    curves = {f"{cfg.model.name}-{cfg.mode.name}": result.val_curve}
    mlflow.log_figure(plots.accuracy_curves(curves, "Validation accuracy"), "val_acc.png")
    if cfg.mlflow.log_model:
        example = data.Normalizer(torch.device("cpu"))(next(iter(loaders["val"]))[0][:1])
        tracking.log_model(model, example)
    log.info(
        "best val acc %.4f at epoch %d; browse runs with: visiontune-ui", result.best_acc, result.best_epoch
    )
    return result.best_acc


def load_data(data_cfg: DictConfig, launch_dir: Path):
    """The checked folder: its root, class names, readable samples per split, skipped count."""
    from visiontune import data

    root = (launch_dir / data_cfg.root).resolve()
    data.prepare_root(root, data_cfg.url, data_cfg.md5, data_cfg.tree_sha256)
    classes, samples = data.find_samples(root)
    skipped = 0
    for split in data.SPLITS:
        samples[split], bad = data.drop_unreadable(samples[split], data_cfg.skip_bad_images)
        skipped += bad
    return root, classes, samples, skipped


def load_model(model_cfg: DictConfig, mode_cfg: DictConfig, num_classes: int, launch_dir: Path):
    """The model as the mode wants it, the norm layers to keep frozen, and the weights used."""
    from visiontune import models

    weights = model_cfg.weights if mode_cfg.pretrained else None
    if weights is not None and not models.is_weights_name(model_cfg.arch, weights):
        weights = str((launch_dir / str(weights)).resolve())  # a file, relative to the launch dir
    model = models.build_model(
        model_cfg.arch, model_cfg.heads, num_classes, weights,
        model_cfg.pretrained_kwargs, model_cfg.scratch_kwargs,
    )  # fmt: skip
    frozen_norms = []
    if not mode_cfg.train_backbone:
        frozen_norms = models.freeze_backbone(model, model_cfg.heads, mode_cfg.freeze_norm_stats)
    return model, frozen_norms, weights


def log_params(cfg: DictConfig, facts: dict) -> None:
    """The resolved config, flattened, plus the facts the run found out."""
    from visiontune import tracking

    config = OmegaConf.to_container(cfg, resolve=True)
    config.pop("mlflow")
    params = tracking.flatten(config)
    params["optimizer.name"] = cfg.optimizer._target_.rsplit(".", 1)[-1].lower()
    params["scheduler.name"] = cfg.scheduler._target_.rsplit(".", 1)[-1] if cfg.scheduler else "none"
    tracking.log_params(params | facts)


def _epoch_logger(epochs: int):
    """One MLflow step and one summary line per epoch."""
    from visiontune import tracking

    def on_epoch(r) -> None:
        tracking.log_metrics(
            {"train_loss": r.train.loss, "train_acc": r.train.acc, "val_loss": r.val.loss,
             "val_acc": r.val.acc, "epoch_seconds": r.seconds, "lr": r.lr},
            step=r.epoch,
        )  # fmt: skip
        log.info(
            "epoch %*d/%d  train loss %.4f acc %.4f | val loss %.4f acc %.4f | %.1fs%s",
            len(str(epochs)), r.epoch, epochs, r.train.loss, r.train.acc, r.val.loss, r.val.acc,
            r.seconds, "  * best" if r.improved else "",
        )  # fmt: skip

    return on_epoch


# Options that live in optional Hydra plugins: (override, plugin module, what to install).
PLUGIN_OPTIONS = (
    ("search=optuna", "hydra_plugins.hydra_optuna_sweeper", "visiontune[optuna]"),
    ("hydra/sweeper=optuna", "hydra_plugins.hydra_optuna_sweeper", "visiontune[optuna]"),
)


def cli() -> None:
    """The console script: main(), after checking that options from optional plugins can load.

    Without the plugin Hydra only says it cannot find 'hydra/sweeper/optuna'; this says what to
    install instead.
    """
    import importlib.util
    import sys

    for option, module, extra in PLUGIN_OPTIONS:
        if option in sys.argv[1:] and importlib.util.find_spec(module) is None:
            sys.exit(f'error: {option} needs a Hydra plugin that is not installed: pip install "{extra}"')
    main()


if __name__ == "__main__":
    cli()
