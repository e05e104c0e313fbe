"""What a run records in MLflow: at its start, after each epoch and at its end (a no-op off rank 0).

Under torchrun every rank trains through the same steps (pipeline.train); rank 0 holds a
RunRecorder and records, the other ranks hold a NullRecorder whose every step does nothing.
The epoch's checkpoint is part of its record: written by rank 0 alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

import visiontune
from visiontune import checkpoint, distributed, optim, redact, report, resume, store, sweep
from visiontune.config import HEAD_GROUP, Job, MlflowSettings, Settings
from visiontune.store import tags

if TYPE_CHECKING:
    from visiontune import engine, models
    from visiontune.pipeline import SetUp

log = logging.getLogger("visiontune")


@dataclass(frozen=True)
class Where:
    """The MLflow store and experiment a run is recorded in (opened by rank 0 alone)."""

    uri: str
    experiment_id: str
    client: object  # an MlflowClient

    @classmethod
    def open(cls, mlflow: MlflowSettings, launch_dir: Path) -> Where:
        uri = store.tracking_uri(mlflow.tracking_uri, launch_dir)
        experiment_id = store.ensure_experiment(uri, mlflow.experiment_name)
        return cls(uri, experiment_id, store.open_store(uri))


def for_rank(where: Where | None, job: Job, continued: resume.Continued) -> RunRecorder | NullRecorder:
    """Rank 0 (which opened `where`) records; the other ranks go through the same steps silently."""
    return RunRecorder(where, job, continued) if where is not None else NullRecorder(continued)


class NullRecorder:
    """A torchrun rank other than 0: every step of the record, doing nothing."""

    def __init__(self, continued: resume.Continued):
        self.continued = continued

    @contextlib.contextmanager
    def tracking(self, cfg: DictConfig) -> Iterator[None]:
        yield

    def started(self, settings: Settings, cfg: DictConfig, setup: SetUp, device) -> dict:
        return setup.loaders

    def resumed(self, saved: checkpoint.Saved | None, progress: engine.Progress | None, epochs: int) -> None:
        pass

    def epoch_ended(self, r: engine.EpochReport, progress: engine.Progress) -> None:
        pass

    def finished(self, result: engine.FitResult, setup: SetUp, skipped: int) -> None:
        pass

    def tested(self, tested: tuple | None, checked) -> None:
        pass

    def done(self, settings: Settings) -> None:
        pass


class RunRecorder:
    """Rank 0's record of one run: opened (new, or the run it continues), then its start, each
    epoch (metrics, console line, checkpoint) and its end (best accuracy, curve, model)."""

    def __init__(self, where: Where, job: Job, continued: resume.Continued):
        self.where, self.job, self.continued = where, job, continued
        self.run_id = continued.run_id
        self.settings: Settings | None = None
        self.logged: set[int] = set()
        # Every epoch's metrics, those before a resume included: each checkpoint holds them all.
        self.metrics: list[dict] = []
        self.flat_config: dict = {}
        self.startup: StartupClock | None = None
        self.training: engine.Training | None = None  # what each checkpoint saves
        self.tagged: Path | None = None  # the folder the run's checkpoint tag names, once written here

    @contextlib.contextmanager
    def tracking(self, cfg: DictConfig) -> Iterator[None]:
        """The MLflow run, open while the steps inside run; it ends FAILED or KILLED if they fail."""
        with contextlib.ExitStack() as held:
            if self.run_id is not None:  # taken before the run reopens: a live one is left untouched
                held.enter_context(store.holding(self.where.uri, self.run_id))
            active = held.enter_context(store.tracked_run(self.where.uri, self._run_start(cfg)))
            if self.run_id is None:
                self.run_id = active.info.run_id
                held.enter_context(store.holding(self.where.uri, self.run_id))
            try:
                yield
            except KeyboardInterrupt:
                self._say_how_to_resume()
                raise
            finally:
                resumed = f"resumed-{self.job.output_dir.name}" if self.continued.run_id else None
                store.log_files(self.job.log_file, resumed)

    def _run_start(self, cfg: DictConfig) -> store.RunStart:
        """A new run (a sweep's child where there is a sweep), or the earlier run to continue."""
        if self.continued.run_id is not None:
            return store.RunStart(self.where.experiment_id, name="", tags={}, run_id=self.continued.run_id)
        parent_id, varied = sweep.read_handoff(self.job.sweep_dir)
        name = run_name(f"{cfg.model.name}-{cfg.mode.name}", varied, self.job.number)
        marks = run_tags(cfg, self.job) | {tags.JOB: sweep.overrides_key(self.job.overrides)}
        return store.RunStart(self.where.experiment_id, name, marks, parent_id)

    def started(self, settings: Settings, cfg: DictConfig, setup: SetUp, device) -> dict:
        """The composed config and what the set-up found (new runs), where checkpoints go; the
        loaders to train with, the training one timing start-up."""
        self.settings, self.flat_config = settings, resume.flat_config(cfg)
        self.training = setup.training
        self.logged = store.logged_steps(self.run_id, "val_acc")
        if self.continued.run_id is None:  # a continued run keeps the params and inputs it started with
            store.log_files(self.job.output_dir / ".hydra", "hydra")
            warn_unused_weights(settings, self.job.overrides)
            checked = setup.checked
            digests = store.log_datasets(checked.root, checked.classes, checked.samples)
            store.log_params(run_params(cfg, settings, setup, device) | digests)
            store.log_params(provenance(self.job.launch_dir, setup.prepared.weights))
        else:
            self._same_splits(setup.checked)
        # The process tells a dead process's run from a live one. The checkpoint folder is tagged
        # once a checkpoint is in it: until then a continued run keeps pointing at its earlier one.
        marks = {tags.PROCESS: store.this_process(), tags.OUTPUT_DIR: str(self.job.output_dir)}
        if settings.checkpoint.every_epochs:
            marks[tags.CONFIG_DIGEST] = resume.digest(self.flat_config)
        store.set_tags(marks)
        self.startup = StartupClock(setup.loaders["train"], self.job.started)
        return setup.loaders | {"train": self.startup}

    def _same_splits(self, checked) -> None:
        """A continued run trains on the splits it started with: a warning names each that changed
        (files added, removed or changed since; the split itself is the same for the same files)."""
        logged = self.where.client.get_run(self.run_id).data.params
        now = store.split_digests(checked.root, checked.classes, checked.samples)
        changed = [key for key, digest in now.items() if logged.get(key, digest) != digest]
        if changed:
            log.warning(
                "resume: the data differs from what run %s started with (%s changed): its files "
                "were added, removed or changed since",
                *(self.run_id, ", ".join(changed)),
            )

    def resumed(self, saved: checkpoint.Saved | None, progress: engine.Progress | None, epochs: int) -> None:
        """Any epoch the checkpoint holds but the run never logged (killed in between), logged now."""
        if saved is None:
            return
        self.metrics = list(saved.state["metrics"][: progress.epoch])
        for epoch, metrics in enumerate(saved.state["metrics"], start=1):
            if epoch not in self.logged:
                store.log_metrics(metrics, step=epoch)
                self.logged.add(epoch)
        log.info("resuming MLflow run %s after epoch %d of %d", self.run_id, progress.epoch, epochs)

    def epoch_ended(self, r: engine.EpochReport, progress: engine.Progress) -> None:
        """Its metrics (once: a continued run may re-train epochs MLflow holds), a console line, and
        every checkpoint.every_epochs epochs (and the last) a checkpoint."""
        metrics = epoch_metrics(r)
        self.metrics.append(metrics)
        self._checkpoint(r.epoch, progress)
        if r.epoch not in self.logged:
            store.log_metrics(metrics, step=r.epoch)
        self.startup.record(step=r.epoch)
        epochs = self.settings.epochs
        score = "mAP" if r.val.extra else "acc"  # multi-label: the best epoch is chosen by mAP
        train_acc = "-" if r.train.acc is None else f"{r.train.acc:.4f}"  # mixed batches: no accuracy
        ema = "" if r.val_ema is None else f" ema {r.val_ema.acc:.4f}"
        log.info(
            "epoch %*d/%d  train loss %.4f %s %s | val loss %.4f %s %.4f%s | %.1fs%s",
            *(len(str(epochs)), r.epoch, epochs, r.train.loss, score, train_acc),
            *(r.val.loss, score, r.val.acc, ema),
            *(r.seconds, "  * best" if r.improved else ""),
        )

    def _checkpoint(self, epoch: int, progress: engine.Progress) -> None:
        every, epochs = self.settings.checkpoint.every_epochs, self.settings.epochs
        if not every or (epoch % every and epoch != epochs):
            return
        extra = {"run_id": self.run_id, "config": self.flat_config, "metrics": self.metrics}
        checkpoint.save(self.job.checkpoints, self.training, progress, extra)
        self._moved_to(self.job.checkpoints)
        if self.settings.checkpoint.log_to_mlflow and epoch == epochs:
            store.log_files(self.job.checkpoints, "checkpoint", text=False)

    def _moved_to(self, folder) -> None:
        """After a checkpoint is written: the run's tag points at its folder, and an earlier
        attempt's checkpoint (now behind this one) is removed: seven interruptions leave one."""
        if self.tagged == folder:
            return
        store.set_tags({tags.CHECKPOINT: str(folder)})
        self.tagged = folder
        earlier = self.continued.folder
        if earlier is not None and earlier.resolve() != folder.resolve():
            checkpoint.remove(earlier)

    def finished(self, result: engine.FitResult, setup: SetUp, skipped: int) -> None:
        """What the run keeps of its fit: skipped images, best accuracy and epoch, the curve, the model."""
        store.delete_tag(tags.RESUME_COMMAND)  # a run that ends has nothing left to continue
        store.log_metrics({"skipped_images": skipped})
        store.log_metrics({"best_val_acc": result.best_acc, "best_epoch": result.best_epoch})
        if setup.checked.multilabel:  # best_val_acc holds the score the best epoch was chosen by
            store.log_metrics({"best_val_mAP": result.best_acc})
        marks = {tags.BEST_WEIGHTS: result.best_from}
        if result.stopped_early:
            marks[tags.EARLY_STOPPED] = store.shorten(result.stopped_early, store.TAG_VALUE_LIMIT)
        store.set_tags(marks)
        curves = {f"{setup.prepared.spec.name}-{self.settings.mode.name}": result.val_curve}
        store.log_figure(report.accuracy_curves(curves, "Validation accuracy"), "val_acc.png")
        log.info(
            "best val acc %.4f at epoch %d%s; browse runs with: visiontune-ui",
            *(
                result.best_acc,
                result.best_epoch,
                " (the weights' moving average)" * (result.best_from == "ema"),
            ),
        )
        if self.settings.mlflow.log_model:
            # A sweep registers only its best child, at its end (sweep.py).
            registered = self.settings.mlflow.registered_model_name if self.job.number is None else None
            log_model(
                setup.prepared, setup.checked, setup.loaders["val"], registered, self.settings.data.threshold
            )

    def tested(self, tested: tuple | None, checked) -> None:
        """The test split's scores with the best weights (test_acc, test_loss, balanced accuracy,
        macro F1, per class; mAP for multi-label) and its confusion matrix; nothing without one."""
        if tested is None:
            return
        metrics, counts = tested
        store.log_metrics({f"test_{key}": value for key, value in metrics.items()})
        if counts is not None:
            store.log_figure(
                report.confusion_matrix(counts.tolist(), checked.classes), "test_confusion_matrix.png"
            )
        score = "mAP" if checked.multilabel else "acc"
        log.info(
            "test %s %.4f, loss %.4f on %d images (the best epoch's weights, scored once)",
            *(score, metrics[score], metrics["loss"], metrics["images"]),
        )

    def done(self, settings: Settings) -> None:
        """After the run FINISHED: its checkpoint files go (the best model is in MLflow), unless kept."""
        if not settings.checkpoint.keep_after_finish:
            checkpoint.remove(self.job.checkpoints)
        model = f"; its model: runs:/{self.run_id}/model" if settings.mlflow.log_model else ""
        log.info("MLflow run %s FINISHED%s", self.run_id, model)

    def _say_how_to_resume(self) -> None:
        folders = (self.job.checkpoints, self.continued.folder)  # this attempt's, or the one it continues
        if any(folder is not None and (folder / checkpoint.LAST).is_file() for folder in folders):
            launch = distributed.Launch.from_env()
            start = (
                f"torchrun --standalone --nproc_per_node={launch.world_size} -m visiontune.train"
                if launch
                else "visiontune-train"
            )
            command = f"{start} resume={self.run_id}"
            store.set_tags({tags.RESUME_COMMAND: command})
            log.info("stopped; continue it with: %s", command)


def epoch_metrics(r: engine.EpochReport) -> dict[str, float]:
    metrics = {"train_loss": r.train.loss, "train_acc": r.train.acc, "val_loss": r.val.loss}
    metrics |= {"val_acc": r.val.acc, "epoch_seconds": r.seconds, "lr": r.lrs[HEAD_GROUP]}
    metrics |= {f"val_{key}": value for key, value in r.val.extra.items()}  # multi-label: mAP, F1s
    metrics |= {"train_acc_top5": r.train.top5, "val_acc_top5": r.val.top5}  # over 5 classes only
    if r.val_ema is not None:
        metrics |= {
            "val_acc_ema": r.val_ema.acc,
            "val_loss_ema": r.val_ema.loss,
            "val_acc_ema_top5": r.val_ema.top5,
        }
    metrics = {key: value for key, value in metrics.items() if value is not None}  # train_acc: mixed batches
    if len(r.lrs) > 1:  # layer-wise rates, and how many groups trained (staged unfreezing)
        metrics |= {f"lr_{name}": lr for name, lr in r.lrs.items() if name != HEAD_GROUP}
        metrics["trainable_groups"] = len(r.trainable)
    return metrics


# --- a new run's name, tags and params ---------------------------------------------------------------


def run_name(label: str, varied: list[str], number: int | None) -> str:
    name = label
    if set(varied) - {"model", "mode"}:  # seeds, lrs, Optuna trials: Hydra's job number tells them apart
        name += f" #{number}"
    return name


def run_tags(cfg: DictConfig, job: Job) -> dict[str, str]:
    """Tags to filter and group by in the UI: the groups, the lr, and every overridden key."""
    marks = {group: job.choices[group] for group in tags.GROUPS}
    marks[tags.LR] = str(cfg.optimizer.lr)
    for override in job.overrides:
        key, _, value = override.partition("=")
        # MLflow tag keys allow letters, digits, _ - . / and spaces; `model@x` or `+key` do not fit.
        tag = re.sub(r"[^\w\-./ ]", "_", key.lstrip("+~"))
        marks[tag] = store.shorten(redact(value), store.TAG_VALUE_LIMIT)
    return marks


def warn_unused_weights(settings: Settings, overrides: list[str]) -> None:
    if not settings.mode.pretrained and any(o.lstrip("+").startswith("model.weights=") for o in overrides):
        log.warning(
            "mode=%s starts from random weights: the model.weights given is not used", settings.mode.name
        )


def run_params(cfg: DictConfig, settings: Settings, setup: SetUp, device) -> dict:
    """The resolved config, flattened, plus the facts the run found out (each layer group's rate)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("mlflow")
    checked, prepared = setup.checked, setup.prepared
    rates = optim.group_rates(prepared, settings.optim.lr, settings.optim.lr_decay)
    total = prepared.parameter_counts()[1]
    # What trains once every stage has begun: a staged run's first epochs train its head alone.
    trainable = sum(p.numel() for name in rates for p in prepared.groups[name])
    world = distributed.world_size()
    return (
        store.flatten(resolved)
        | optim.rate_params(rates)
        | {
            "optimizer.name": settings.optim.optimizer_name,
            "scheduler.name": settings.optim.scheduler_name,
            "data.root": str(checked.root),
            "model.weights": str(prepared.weights),
            "num_classes": len(checked.classes),
            "classes": ",".join(checked.classes),
            "train_images": len(checked.samples["train"]),
            "val_images": len(checked.samples["val"]),
            **data_facts(checked, setup.training.criterion),
            "skipped_images": checked.skipped,
            "trainable_params": trainable,
            "total_params": total,
            # What model=torchvision|timm found in the model and its weights (null in the config).
            **prepared.spec.found_params(),
            "device_used": str(device),
            # batch_size is per rank, as in timm: each optimiser step sees world_size times as many images.
            "world_size": world,
            "batch_size_per_rank": settings.batch_size,
            "global_batch_size": settings.batch_size * world,
        }
    )


def data_facts(checked, criterion) -> dict:
    """The test split's size, whether labels are multi-label, and loss.class_weights=auto's weights."""
    facts: dict = {"multilabel": str(checked.multilabel).lower()}
    if "test" in checked.samples:
        facts["test_images"] = len(checked.samples["test"])
    weights = getattr(criterion, "pos_weight" if checked.multilabel else "weight", None)
    if weights is not None:
        names = [re.sub(r"[^\w\-./ ]", "_", name) for name in checked.classes]  # MLflow's key characters
        facts |= {
            f"loss.class_weight.{name}": round(w, 6) for name, w in zip(names, weights.tolist(), strict=True)
        }
    return facts


def provenance(launch_dir: Path, weights: models.Weights | None) -> dict[str, str]:
    """What repeating this run needs besides its config: package versions, the launch folder's
    git commit (and whether files differed from it), the weights file's content."""
    from importlib.metadata import version

    facts = {f"version.{name}": version(name) for name in ("visiontune", "torch", "torchvision", "mlflow")}
    facts |= git_state(launch_dir)
    if weights is not None and weights.kind == "file":
        facts["model.weights_sha256"] = file_sha256(Path(weights.name))
    return facts


def file_sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_state(folder: Path) -> dict[str, str]:
    """{git.commit, git.dirty} of the repository holding `folder`; {} outside one or without git."""
    import subprocess

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10)
        if done.returncode:
            raise OSError(done.stderr)
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git.commit": commit, "git.dirty": str(dirty).lower()}


def log_model(
    prepared: models.PreparedModel, checked, val_loader, registered_name: str | None, threshold=0.5
):
    """The best model as users will use it: weights, class names and preprocessing, one image as
    its example (an encoded JPEG of a few kB, where a float tensor made a 7.5 MB JSON file)."""
    from torchvision.io import encode_jpeg

    from visiontune import classifier

    spec = prepared.spec
    distributed.plain_batchnorm(prepared.module)  # the logged model runs in one process
    model = classifier.Classifier(
        prepared.module, checked.classes, spec.input_size, spec.name, spec.arch, mean=spec.mean, std=spec.std
    )
    model.multilabel, model.threshold = checked.multilabel, threshold
    image = next(iter(val_loader))[0][0].cpu()
    example = encode_jpeg(image, quality=90).numpy().tobytes()
    store.log_model(model, example, registered_name)


# --- start-up: from the process's start to the first training batch ------------------------------------

_jobs_begun = 0  # a sweep's jobs under the basic or joblib launcher share a process


def startup_began() -> float:
    """time.monotonic() when this job's start-up began: for a process's first job, when the process
    started, so that the interpreter, the imports and Hydra count; a later job in the same process,
    its imports done, begins now."""
    global _jobs_begun
    _jobs_begun += 1
    now = time.monotonic()
    if _jobs_begun > 1:
        return now
    age = process_age()
    return now - age if age is not None else visiontune.IMPORTED_AT


def process_age() -> float | None:
    """Seconds since this process started, as the kernel recorded it (Linux); None elsewhere."""
    try:
        with open("/proc/self/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()  # the name in (...) may hold spaces
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime: ticks after boot
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class StartupClock:
    """The training loader, noting when it hands out its first batch: where start-up ends."""

    def __init__(self, loader, began: float):
        self.loader, self.began = loader, began
        self.first_batch: float | None = None
        self.recorded = False

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):  # set_epoch, skipped: the loader's own
        return getattr(self.loader, name)

    def __iter__(self):
        for batch in self.loader:
            if self.first_batch is None:
                self.first_batch = time.monotonic()
            yield batch

    def record(self, step: int) -> None:
        """Start-up as the `startup_seconds` metric and a console line, once the first batch came; once.

        At the step of the epoch it preceded: a resumed run records its new process's start-up too."""
        if self.first_batch is None or self.recorded:
            return
        seconds = self.first_batch - self.began
        store.log_metrics({"startup_seconds": seconds}, step=step)
        log.info("start-up: %.1fs from the process's start to the first training batch", seconds)
        self.recorded = True
