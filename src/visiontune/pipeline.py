"""run(cfg): one training run as a flat list of steps, and the only place that sees the whole config.

Below it every function takes the values it needs: a ModelSpec, a Mode, paths, numbers.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from visiontune import (
    checkpoint,
    classifier,
    config,
    data,
    engine,
    models,
    redact,
    report,
    store,
    sweep,
)
from visiontune.config import Mode

log = logging.getLogger("visiontune")


@dataclass(frozen=True)
class Job:
    """What Hydra knows of this run: where it was launched, where it writes, what was overridden."""

    launch_dir: Path
    output_dir: Path
    log_file: Path
    choices: Mapping[str, str]
    overrides: list[str]
    number: int | None  # the job's number in a multirun
    sweep_dir: Path | None  # a multirun's folder, where its sweep hand-off waits

    @classmethod
    def from_hydra(cls) -> Job:
        hydra = HydraConfig.get()
        launch_dir, output_dir = Path(hydra.runtime.cwd), Path(hydra.runtime.output_dir)
        multirun = hydra.mode == RunMode.MULTIRUN
        return cls(
            launch_dir,
            output_dir,
            log_file=output_dir / f"{hydra.job.name}.log",
            choices=dict(hydra.runtime.choices),
            overrides=list(hydra.overrides.task),
            number=hydra.job.num if multirun else None,
            sweep_dir=launch_dir / hydra.sweep.dir if multirun else None,
        )


def run(cfg: DictConfig) -> float:
    """Train one configuration in one MLflow run (or continue one); returns its best val accuracy."""
    job = Job.from_hydra()
    uri = store.tracking_uri(cfg.mlflow.tracking_uri, job.launch_dir)
    experiment_id = store.ensure_experiment(uri, cfg.mlflow.experiment_name)
    earlier = find_earlier(cfg, job, store.open_store(uri), experiment_id)
    if earlier.finished is not None:  # a resumed sweep's job that already ran to its end
        log.info("already FINISHED as MLflow run %s: not trained again", earlier.finished.info.run_id)
        return earlier.finished.data.metrics.get("best_val_acc", 0.0)
    return train(cfg, job, uri, experiment_id, earlier)


@dataclass(frozen=True)
class Earlier:
    """What `resume=` found: a checkpoint to continue, a run to continue without one, or a finished run."""

    saved: checkpoint.Saved | None = None
    run_id: str | None = None
    finished: object | None = None  # an MLflow Run


def find_earlier(cfg: DictConfig, job: Job, client, experiment_id: str) -> Earlier:
    """A single run resumes what resume= names; a sweep's job, its own child of the reopened parent
    (resume=), or of its own sweep when the job starts again (requeued after a preemption or time-out)."""
    parent_id, _ = sweep.read_handoff(job.sweep_dir)
    if parent_id is None:
        if not cfg.resume:
            return Earlier()
        saved = checkpoint.find(cfg.resume, client, experiment_id, cfg)
        return Earlier(saved, saved.run_id)
    if not cfg.resume and not started_before(job):
        return Earlier()
    child = store.child_for(client, parent_id, sweep.overrides_key(job.overrides))
    if child is None:  # never started
        return Earlier()
    if child.info.status == "FINISHED":
        return Earlier(finished=child)
    checkpoint.refuse_if_training(child, f"resume={cfg.resume}" if cfg.resume else "a requeued job")
    folder = Path(child.data.tags.get(store.CHECKPOINT_TAG, "/nonexistent"))
    saved = checkpoint.read(folder) if (folder / checkpoint.LAST).is_file() else None
    return Earlier(saved, child.info.run_id)  # without a checkpoint: the same run, from its start


def started_before(job: Job) -> bool:
    """Whether this sweep job ran before, in this same sweep: requeued by SLURM (which counts its
    restarts), or started again by submitit_local (which says nothing, but the job's own output
    folder then holds its checkpoint). A job of a new sweep finds no child of its own either way."""
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    requeued = restarts.isdigit() and int(restarts) > 0
    return requeued or (job.output_dir / "checkpoints" / checkpoint.LAST).is_file()


def train(cfg: DictConfig, job: Job, uri: str, experiment_id: str, earlier: Earlier) -> float:
    """The run's steps: open it, check the data, prepare the model, fit, record."""
    saved, continued = earlier.saved, earlier.run_id
    cfg = checkpoint.resumed_config(saved, cfg, job.overrides) if saved else cfg
    spec, mode = config.model_spec(cfg.model), config.mode_of(cfg.mode)
    label = f"{spec.name}-{mode.name}"
    with store.tracked_run(uri, run_start(cfg, job, experiment_id, continued, label)) as active:
        run_id = active.info.run_id
        try:
            config.check_values(cfg)  # the CLI checked a single run's values; a sweep's job is a FAILED child
            record_start(cfg, job, continued, mode)
            device = engine.pick_device(str(cfg.device))
            checked = check_data(cfg.data, job.launch_dir)
            torch.manual_seed(cfg.seed)
            weights = models.resolve_weights(spec.arch, cfg.model.weights, job.launch_dir)
            prepared = models.prepare(spec, mode, len(checked.classes), weights)
            if continued is None:  # a continued run keeps the params and inputs it started with
                store.log_params(run_params(cfg, checked, prepared, device))
                store.log_datasets(checked.root, checked.classes, checked.samples)
            announce(prepared, mode, checked, device)
            loaders = build_loaders(cfg, checked, prepared, device)
            training = build_training(cfg, prepared, device)
            progress = resume_progress(saved, training, run_id)
            on_epoch = EpochRecorder(cfg, job.output_dir / "checkpoints", training, run_id, saved)
            result = engine.fit(training, loaders, cfg.data.val_cache_mb * 2**20, on_epoch, progress)
            store.log_metrics({"skipped_images": skipped_images(checked, loaders)})
            record(result, label)
            if cfg.mlflow.log_model:
                # A sweep registers only its best child, at its end (sweep.py).
                registered = cfg.mlflow.registered_model_name if job.number is None else None
                log_model(prepared, checked.classes, loaders["val"], registered)
        except KeyboardInterrupt:
            say_how_to_resume(run_id, job.output_dir / "checkpoints")
            raise
        finally:
            store.log_files(job.log_file, f"resumed-{job.output_dir.name}" if continued else None)
    if not cfg.checkpoint.keep_after_finish:  # the best model is in MLflow; a finished run needs no more
        shutil.rmtree(job.output_dir / "checkpoints", ignore_errors=True)
    model = f"; its model: runs:/{run_id}/model" if cfg.mlflow.log_model else ""
    log.info("MLflow run %s FINISHED%s", run_id, model)
    return result.best_acc


def run_start(
    cfg: DictConfig, job: Job, experiment_id: str, continued: str | None, label: str
) -> store.RunStart:
    """A new run (a sweep's child where there is a sweep), or the earlier run to continue."""
    if continued is not None:
        return store.RunStart(experiment_id, name="", tags={}, run_id=continued)
    parent_id, varied = sweep.read_handoff(job.sweep_dir)
    name = run_name(label, varied, job.number)
    tags = run_tags(cfg, job) | {store.JOB_TAG: sweep.overrides_key(job.overrides)}
    return store.RunStart(experiment_id, name, tags, parent_id)


def record_start(cfg: DictConfig, job: Job, continued: str | None, mode: Mode) -> None:
    """The composed config (new runs), and where this run's checkpoints go and what they match."""
    if continued is None:
        store.log_files(job.output_dir / ".hydra", "hydra")
        warn_unused_weights(mode, job.overrides)
    tags = {store.PROCESS_TAG: store.this_process()}  # tells a dead process's run from a live one
    if cfg.checkpoint.every_epochs:
        tags[checkpoint.FOLDER_TAG] = str(job.output_dir / "checkpoints")
        tags[checkpoint.DIGEST_TAG] = checkpoint.digest(checkpoint.flat_config(cfg))
    store.set_tags(tags)


def resume_progress(saved, training: engine.Training, run_id: str) -> engine.Progress | None:
    """The saved states put back, and any epoch the checkpoint holds but the run never logged."""
    if saved is None:
        return None
    progress = checkpoint.restore(saved, training)
    logged = store.logged_steps(run_id, "val_acc")
    for epoch, metrics in enumerate(saved.state["metrics"], start=1):
        if epoch not in logged:  # killed between the checkpoint and its metrics
            store.log_metrics(metrics, step=epoch)
    log.info("resuming MLflow run %s after epoch %d of %d", run_id, progress.epoch, training.epochs)
    return progress


def say_how_to_resume(run_id: str, folder: Path) -> None:
    if (folder / checkpoint.LAST).is_file():
        command = f"visiontune-train resume={run_id}"
        store.set_tags({checkpoint.RESUME_TAG: command})
        log.info("stopped; continue it with: %s", command)


def warn_unused_weights(mode: Mode, overrides: list[str]) -> None:
    if not mode.pretrained and any(o.lstrip("+").startswith("model.weights=") for o in overrides):
        log.warning("mode=%s starts from random weights: the model.weights given is not used", mode.name)


def run_name(label: str, varied: list[str], number: int | None) -> str:
    name = label
    if set(varied) - {"model", "mode"}:  # seeds, lrs, Optuna trials: Hydra's job number tells them apart
        name += f" #{number}"
    return name


def run_tags(cfg: DictConfig, job: Job) -> dict[str, str]:
    """Tags to filter and group by in the UI: the groups, the lr, and every overridden key."""
    tags = {group: job.choices[group] for group in ("model", "mode", "data", "optimizer", "scheduler")}
    tags["lr"] = str(cfg.optimizer.lr)
    for override in job.overrides:
        key, _, value = override.partition("=")
        # MLflow tag keys allow letters, digits, _ - . / and spaces; `model@x` or `+key` do not fit.
        tag = re.sub(r"[^\w\-./ ]", "_", key.lstrip("+~"))
        tags[tag] = store.shorten(redact(value), store.TAG_VALUE_LIMIT)
    return tags


def check_data(data_cfg: DictConfig, launch_dir: Path) -> data.CheckedData:
    """The data folder (downloaded first where it is missing and a URL is known), checked."""
    root = (launch_dir / data_cfg.root).resolve()
    data.prepare_root(root, data_cfg.url, data_cfg.md5, data_cfg.tree_sha256)
    return data.check_folder(root, data_cfg.skip_bad_images, data_cfg.get("max_image_pixels"))


def run_params(cfg: DictConfig, checked: data.CheckedData, prepared: models.PreparedModel, device) -> dict:
    """The resolved config, flattened, plus the facts the run found out."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("mlflow")
    trainable, total = prepared.parameter_counts()
    return store.flatten(resolved) | {
        "optimizer.name": cfg.optimizer._target_.rsplit(".", 1)[-1].lower(),
        "scheduler.name": cfg.scheduler._target_.rsplit(".", 1)[-1] if cfg.scheduler else "none",
        "data.root": str(checked.root),
        "model.weights": str(prepared.weights),
        "num_classes": len(checked.classes),
        "classes": ",".join(checked.classes),
        "train_images": len(checked.samples["train"]),
        "val_images": len(checked.samples["val"]),
        "skipped_images": checked.skipped,
        "trainable_params": trainable,
        "total_params": total,
        "device_used": str(device),
    }


def announce(prepared: models.PreparedModel, mode: Mode, checked: data.CheckedData, device) -> None:
    trainable, total = prepared.parameter_counts()
    counts = {split: len(samples) for split, samples in checked.samples.items()}
    log.info(
        "%s %s on %s: %d classes, %d train / %d val images, %s of %s parameters train",
        *(prepared.spec.name, mode.name, device, len(checked.classes), counts["train"], counts["val"]),
        *(f"{trainable:,}", f"{total:,}"),
    )


def worker_count(requested) -> int:
    if requested != "auto":
        return requested
    return min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def build_loaders(cfg: DictConfig, checked: data.CheckedData, prepared: models.PreparedModel, device) -> dict:
    """Train and val loaders; the decoded val images kept after the first epoch where they fit."""
    settings = data.LoaderSettings(
        input_size=cfg.model.input_size,
        batch_size=cfg.batch_size,
        num_workers=worker_count(cfg.num_workers),
        seed=cfg.seed,
        pin_memory=device.type == "cuda",
        skip_bad=cfg.data.skip_bad_images,
        max_image_pixels=cfg.data.get("max_image_pixels"),
        min_train_batch=prepared.spec.min_batch_size,
    )
    loaders = data.build_loaders(checked.samples, settings)
    # A cached backbone output already spares the val images' decoding after the first epoch.
    fits = (
        data.replay_bytes(len(checked.samples["val"]), settings.input_size) <= cfg.data.val_cache_mb * 2**20
    )
    if not prepared.cache_backbone and fits:
        loaders["val"] = data.ReplayLoader(loaders["val"])
    return loaders


def build_training(cfg: DictConfig, prepared: models.PreparedModel, device) -> engine.Training:
    """Loss, optimiser, schedule, precision and memory layout around the prepared model."""
    amp_dtype, frozen_amp_dtype = engine.precision_for(str(cfg.precision), device)
    # auto: NHWC wherever bf16 runs, whose fast convolutions want it (x1.8 on a CPU's frozen
    # squeezenet pass); float32 convolutions measured the same either way.
    channels_last = cfg.channels_last
    if channels_last == "auto":
        frozen_pass = frozen_amp_dtype if prepared.cache_backbone else None  # only feature_extract has one
        channels_last = (amp_dtype or frozen_pass) == torch.bfloat16
    layout = torch.channels_last if channels_last else torch.preserve_format
    if cfg.precision == "auto" or cfg.channels_last == "auto":
        name = {None: "float32", torch.bfloat16: "bf16", torch.float16: "fp16"}
        frozen = f", frozen backbone {name[frozen_amp_dtype]}" if prepared.cache_backbone else ""
        log.info("precision: training %s%s; channels_last %s", name[amp_dtype], frozen, channels_last)
    prepared.module.to(device, memory_format=layout)
    optimizer = instantiate(cfg.optimizer)(
        params=[p for p in prepared.module.parameters() if p.requires_grad]
    )
    return engine.Training(
        model=prepared,
        criterion=torch.nn.CrossEntropyLoss(),
        optimizer=optimizer,
        scheduler=instantiate(cfg.scheduler)(optimizer=optimizer) if cfg.scheduler else None,
        scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
        runtime=engine.Runtime(
            device, data.Normalizer(device), amp_dtype, channels_last, frozen_amp_dtype=frozen_amp_dtype
        ),
        epochs=cfg.epochs,
    )


class EpochRecorder:
    """After each epoch: its metrics to MLflow, a console line, and (every N epochs) a checkpoint.

    A continued run re-trains epochs after its checkpoint whose metrics MLflow may already hold
    (with checkpoint.every_epochs above 1): those steps are not logged twice.
    """

    def __init__(self, cfg: DictConfig, folder: Path, training: engine.Training, run_id: str, saved):
        self.folder, self.training, self.run_id = folder, training, run_id
        self.every, self.to_mlflow = cfg.checkpoint.every_epochs, cfg.checkpoint.log_to_mlflow
        self.config = checkpoint.flat_config(cfg)
        self.logged = store.logged_steps(run_id, "val_acc")
        # Every epoch's metrics, those before a resume included: each checkpoint carries them all.
        self.metrics: list[dict] = (
            list(saved.state["metrics"][: saved.state["progress"]["epoch"]]) if saved else []
        )

    def __call__(self, r: engine.EpochReport, progress: engine.Progress) -> None:
        metrics = {"train_loss": r.train.loss, "train_acc": r.train.acc, "val_loss": r.val.loss}
        metrics |= {"val_acc": r.val.acc, "epoch_seconds": r.seconds, "lr": r.lr}
        self.metrics.append(metrics)
        epochs = self.training.epochs
        if self.every and (r.epoch % self.every == 0 or r.epoch == epochs):
            extra = {"run_id": self.run_id, "config": self.config, "metrics": self.metrics}
            checkpoint.save(self.folder, self.training, progress, extra)
            if self.to_mlflow and r.epoch == epochs:
                store.log_files(self.folder, "checkpoint", text=False)
        if r.epoch not in self.logged:
            store.log_metrics(metrics, step=r.epoch)
        log.info(
            "epoch %*d/%d  train loss %.4f acc %.4f | val loss %.4f acc %.4f | %.1fs%s",
            *(len(str(epochs)), r.epoch, epochs, r.train.loss, r.train.acc, r.val.loss, r.val.acc),
            *(r.seconds, "  * best" if r.improved else ""),
        )


def skipped_images(checked: data.CheckedData, loaders: dict) -> int:
    """Images left out: unreadable headers found up front, and images that failed to decode."""
    return checked.skipped + sum(loader.skipped for loader in loaders.values())


def record(result: engine.FitResult, label: str) -> None:
    """What the run keeps of its fit: best accuracy and epoch, the curve."""
    store.log_metrics({"best_val_acc": result.best_acc, "best_epoch": result.best_epoch})
    curves = {label: result.val_curve}
    store.log_figure(report.accuracy_curves(curves, "Validation accuracy"), "val_acc.png")
    log.info(
        "best val acc %.4f at epoch %d; browse runs with: visiontune-ui", result.best_acc, result.best_epoch
    )


def log_model(prepared: models.PreparedModel, classes: list[str], val_loader, registered_name: str | None):
    """The best model as users will use it: weights, class names and preprocessing, one image as
    its example (an encoded JPEG of a few kB, where a float tensor made a 7.5 MB JSON file)."""
    from torchvision.io import encode_jpeg

    spec = prepared.spec
    model = classifier.Classifier(prepared.module, classes, spec.input_size, spec.name, spec.arch)
    image = next(iter(val_loader))[0][0].cpu()
    example = encode_jpeg(image, quality=90).numpy().tobytes()
    store.log_model(model, example, registered_name)
