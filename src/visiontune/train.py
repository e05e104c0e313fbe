"""visiontune-train: @hydra.main -> run(cfg), the only place that sees the whole config.

Heavy libraries (torch, torchvision, mlflow) are imported inside run(), so that --help,
--cfg and config errors answer at once.
"""

from __future__ import annotations

import logging
import time
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
    parent = None
    if hydra_cfg.mode == RunMode.MULTIRUN:
        parent = tracking.parent_run_id(launch_dir / hydra_cfg.sweep.dir)
    tags = run_tags(cfg, choices, hydra_cfg.overrides.task)
    run_name = f"{cfg.model.name}-{cfg.mode.name}"
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
        tags[key.lstrip("+~")] = value[:5000]
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
    if cfg.num_workers < 0:
        raise VisiontuneError(f"num_workers={cfg.num_workers} must be 0 or more")
    if str(cfg.precision) not in PRECISIONS:
        raise VisiontuneError(f"precision={cfg.precision} must be one of {', '.join(PRECISIONS)}")
    if cfg.mode.pretrained and cfg.model.weights is None:
        raise VisiontuneError(
            f"mode={cfg.mode.name} starts from pretrained weights but model.weights is null: "
            f"set model.weights=DEFAULT or a state-dict path, or use mode=scratch"
        )


def _example(key: str) -> str:
    return {"epochs": "15", "batch_size": "8", "optimizer.lr": "0.001"}[key]


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
    root = data.prepare_root(
        (launch_dir / cfg.data.root).resolve(), cfg.data.url, cfg.data.md5, cfg.data.tree_sha256
    )
    classes, samples = data.find_samples(root)
    skipped = 0
    for split in data.SPLITS:
        samples[split], bad = data.drop_unreadable(samples[split], cfg.data.skip_bad_images)
        skipped += bad

    torch.manual_seed(cfg.seed)
    weights = cfg.model.weights if cfg.mode.pretrained else None
    if weights not in (None, "DEFAULT") and not str(weights).isupper():
        weights = str((launch_dir / str(weights)).resolve())
    model = models.build_model(
        cfg.model.arch,
        cfg.model.heads,
        len(classes),
        weights,
        cfg.model.pretrained_kwargs,
        cfg.model.scratch_kwargs,
    )
    frozen_norms = []
    if not cfg.mode.train_backbone:
        frozen_norms = models.freeze_backbone(model, cfg.model.heads, cfg.mode.freeze_norm_stats)
    trainable, total = models.count_parameters(model)

    config = OmegaConf.to_container(cfg, resolve=True)
    config.pop("mlflow")
    params = tracking.flatten(config)
    params.update(
        {
            "data.root": str(root),
            "model.weights": weights,
            "optimizer.name": cfg.optimizer._target_.rsplit(".", 1)[-1].lower(),
            "scheduler.name": cfg.scheduler._target_.rsplit(".", 1)[-1] if cfg.scheduler else "none",
            "num_classes": len(classes),
            "classes": ",".join(classes),
            "train_images": len(samples["train"]),
            "val_images": len(samples["val"]),
            "skipped_images": skipped,
            "trainable_params": trainable,
            "total_params": total,
            "device_used": str(device),
        }
    )
    tracking.log_params(params)
    log.info(
        "%s %s on %s: %d classes, %d train / %d val images, %s of %s parameters train",
        cfg.model.name,
        cfg.mode.name,
        device,
        len(classes),
        len(samples["train"]),
        len(samples["val"]),
        f"{trainable:,}",
        f"{total:,}",
    )

    runtime = engine.Runtime(
        device,
        data.Normalizer(device),
        getattr(torch, PRECISIONS[str(cfg.precision)]) if PRECISIONS[str(cfg.precision)] else None,
        cfg.channels_last,
    )
    model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    optimizer = instantiate(cfg.optimizer)(params=[p for p in model.parameters() if p.requires_grad])
    scheduler = instantiate(cfg.scheduler)(optimizer=optimizer) if cfg.scheduler else None
    scaler = torch.amp.GradScaler(device.type, enabled=runtime.amp_dtype == torch.float16)
    loaders = data.build_loaders(
        samples,
        cfg.model.input_size,
        cfg.batch_size,
        cfg.num_workers,
        cfg.seed,
        device.type == "cuda",
        cfg.data.skip_bad_images,
    )
    # Work done once instead of every epoch: with a frozen backbone in eval mode, the head's
    # inputs for the val split; otherwise the decoded val images (their transform is fixed).
    budget = cfg.data.replay_val_mb * 2**20
    trunk = None
    if not cfg.mode.train_backbone and cfg.mode.freeze_norm_stats:
        trunk = engine.FrozenTrunk(model, cfg.model.heads[0], budget)
    elif data.replay_bytes(len(samples["val"]), cfg.model.input_size) <= budget:
        loaders["val"] = data.ReplayLoader(loaders["val"])
    criterion = torch.nn.CrossEntropyLoss()

    best_acc, best_epoch, best_state, val_curve = -1.0, 0, None, []
    for epoch in range(1, cfg.epochs + 1):
        tic = time.perf_counter()
        tr = engine.train_one_epoch(
            model,
            loaders["train"],
            criterion,
            optimizer,
            runtime,
            scaler,
            cfg.model.aux_loss_weight,
            frozen_norms,
            desc=f"epoch {epoch} train",
        )
        va = engine.evaluate(model, loaders["val"], criterion, runtime, f"epoch {epoch} val", trunk)
        if scheduler is not None:
            scheduler.step()
        seconds = time.perf_counter() - tic
        improved = va.acc > best_acc
        if improved:
            best_acc, best_epoch = va.acc, epoch
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        val_curve.append(va.acc)
        mlflow.log_metrics(
            {
                "train_loss": tr.loss,
                "train_acc": tr.acc,
                "val_loss": va.loss,
                "val_acc": va.acc,
                "epoch_seconds": seconds,
                "lr": optimizer.param_groups[0]["lr"],
            },
            step=epoch,
        )
        log.info(
            "epoch %*d/%d  train loss %.4f acc %.4f | val loss %.4f acc %.4f | %.1fs%s",
            len(str(cfg.epochs)),
            epoch,
            cfg.epochs,
            tr.loss,
            tr.acc,
            va.loss,
            va.acc,
            seconds,
            "  * best" if improved else "",
        )

    model.load_state_dict(best_state)
    mlflow.log_metrics({"best_val_acc": best_acc, "best_epoch": best_epoch})
    mlflow.log_figure(
        plots.accuracy_curves({f"{cfg.model.name}-{cfg.mode.name}": val_curve}, "Validation accuracy"),
        "val_acc.png",
    )
    if cfg.mlflow.log_model:
        example = data.Normalizer(torch.device("cpu"))(next(iter(loaders["val"]))[0][:1])
        tracking.log_model(model, example)
    log.info("best val acc %.4f at epoch %d; browse runs with: visiontune-ui", best_acc, best_epoch)
    return best_acc


if __name__ == "__main__":
    main()
