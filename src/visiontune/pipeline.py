"""run(cfg): one training run as a flat list of steps, and the only place that sees the whole config.

Below it every function takes the values it needs: a ModelSpec, a Mode, paths, numbers.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

import visiontune
from visiontune import (
    augment,
    checkpoint,
    classifier,
    config,
    data,
    distributed,
    engine,
    models,
    optim,
    redact,
    report,
    runtime,
    store,
    sweep,
)
from visiontune.config import HEAD_GROUP, Mode

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
    started: float = field(default_factory=time.monotonic)  # when its start-up began: startup_began()

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
            started=startup_began(),
        )


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


def run(cfg: DictConfig) -> float:
    """Train one configuration in one MLflow run (or continue one); returns its best val accuracy.

    Under torchrun every rank trains; rank 0 alone records, and hands the others what it decided.
    """
    job = Job.from_hydra()
    launch = distributed.Launch.from_env()
    device = runtime.pick_device(str(cfg.device), launch.local_rank if launch else None, job.number)
    with distributed.process_group(launch, device):
        if not distributed.is_main():
            return follow(cfg, job, device, distributed.broadcast(None))
        uri = store.tracking_uri(cfg.mlflow.tracking_uri, job.launch_dir)
        experiment_id = store.ensure_experiment(uri, cfg.mlflow.experiment_name)
        client = store.open_store(uri)
        if launch is not None and launch.restart_count > 0:
            earlier = after_restart(job, client, experiment_id)
        else:
            earlier = find_earlier(cfg, job, client, experiment_id)
        distributed.broadcast(Plan(earlier.finished is None, earlier.saved.folder if earlier.saved else None))
        if earlier.finished is not None:  # a resumed sweep's job (or a restart) that already ran to its end
            log.info("already FINISHED as MLflow run %s: not trained again", earlier.finished.info.run_id)
            return earlier.finished.data.metrics.get("best_val_acc", 0.0)
        return train(cfg, job, uri, experiment_id, earlier, device)


@dataclass(frozen=True)
class Plan:
    """What rank 0 decided for the other torchrun ranks: whether to train, and from which checkpoint
    (every rank loads the same one)."""

    train: bool
    checkpoint: Path | None


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


def after_restart(job: Job, client, experiment_id: str) -> Earlier:
    """torchrun --max-restarts restarted the workers: continue the run this launch started, from
    the last checkpoint in its output folder (shared by every attempt: the folder is named by
    TORCHELASTIC_RUN_ID). A run killed before its first checkpoint starts over in the same run."""
    folder = job.output_dir / "checkpoints"
    query = f"tags.`{checkpoint.FOLDER_TAG}` = '{folder}'"
    runs = client.search_runs([experiment_id], query, max_results=1)
    if not runs:  # killed before its run was recorded (or checkpoint.every_epochs=0)
        return Earlier()
    if runs[0].info.status == "FINISHED":
        return Earlier(finished=runs[0])
    saved = checkpoint.read(folder) if (folder / checkpoint.LAST).is_file() else None
    log.info("torchrun restarted the workers: continuing MLflow run %s", runs[0].info.run_id)
    return Earlier(saved, runs[0].info.run_id)


def train(cfg: DictConfig, job: Job, uri: str, experiment_id: str, earlier: Earlier, device) -> float:
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
            setup = set_up(cfg, job, spec, mode, device)
            checked, prepared, training = setup.checked, setup.prepared, setup.training
            startup = StartupClock(setup.loaders["train"], job.started)
            loaders = setup.loaders | {"train": startup}
            if continued is None:  # a continued run keeps the params and inputs it started with
                digests = store.log_datasets(checked.root, checked.classes, checked.samples)
                store.log_params(run_params(cfg, checked, prepared, device) | digests)
                store.log_params(provenance(job.launch_dir, prepared.weights))
            progress = resume_progress(saved, training, run_id)
            on_epoch = EpochRecorder(cfg, job.output_dir / "checkpoints", training, run_id, saved, startup)
            result = engine.fit(training, loaders, cfg.data.cache_mb * 2**20, on_epoch, progress)
            same_on_every_rank(prepared.module)
            store.log_metrics({"skipped_images": skipped_images(checked, loaders, device)})
            record(result, label)
            if cfg.mlflow.log_model:
                # A sweep registers only its best child, at its end (sweep.py).
                registered = cfg.mlflow.registered_model_name if job.number is None else None
                log_model(prepared, checked.classes, loaders["val"], registered)
            data.close(setup.loaders)
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


def follow(cfg: DictConfig, job: Job, device, plan: Plan) -> float:
    """A torchrun rank other than 0: train() without recording anything, as rank 0 planned."""
    if not plan.train:
        return 0.0
    saved = checkpoint.read(plan.checkpoint) if plan.checkpoint else None
    cfg = checkpoint.resumed_config(saved, cfg, job.overrides) if saved else cfg
    setup = set_up(cfg, job, config.model_spec(cfg.model), config.mode_of(cfg.mode), device)
    progress = checkpoint.restore(saved, setup.training) if saved else None
    result = engine.fit(setup.training, setup.loaders, cfg.data.cache_mb * 2**20, progress=progress)
    same_on_every_rank(setup.prepared.module)
    skipped_images(setup.checked, setup.loaders, device)  # rank 0 logs the sum
    return result.best_acc


@dataclass(frozen=True)
class SetUp:
    """What every rank builds alike: the checked data, the model, its loaders and its training."""

    checked: data.CheckedData
    prepared: models.PreparedModel
    loaders: dict
    training: engine.Training


def set_up(cfg: DictConfig, job: Job, spec: config.ModelSpec, mode: Mode, device) -> SetUp:
    checked = check_data(cfg.data, job.launch_dir)
    runtime.make_deterministic(cfg.deterministic)
    torch.manual_seed(cfg.seed)  # every rank starts from the same weights (DDP also copies rank 0's)
    weights = models.resolve_weights(spec.arch, cfg.model.weights, job.launch_dir)
    prepared = models.prepare(spec, mode, len(checked.classes), weights)
    announce(prepared, mode, checked, device)
    loaders = build_loaders(cfg, checked, prepared, device)
    training = build_training(cfg, prepared, device, steps_per_epoch=len(loaders["train"]))
    return SetUp(checked, prepared, loaders, training)


def same_on_every_rank(module: torch.nn.Module) -> None:
    """Under torchrun: the trained weights checked to be identical on every rank, or the run fails."""
    if distributed.world_size() > 1:
        digest = distributed.same_weights_everywhere(module)
        log.info("final weights identical on all %d ranks (sha256 %s)", distributed.world_size(), digest)


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
        launch = distributed.Launch.from_env()
        start = (
            f"torchrun --standalone --nproc_per_node={launch.world_size} -m visiontune.train"
            if launch
            else ""
        )
        command = f"{start or 'visiontune-train'} resume={run_id}"
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
    with distributed.main_first():  # under torchrun one rank downloads; the others find the folder
        data.prepare_root(root, data_cfg.url, data_cfg.md5, data_cfg.tree_sha256)
    return data.check_folder(root, data_cfg.skip_bad_images, data_cfg.get("max_image_pixels"))


def run_params(cfg: DictConfig, checked: data.CheckedData, prepared: models.PreparedModel, device) -> dict:
    """The resolved config, flattened, plus the facts the run found out (each layer group's rate)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("mlflow")
    trainable, total = prepared.parameter_counts()
    rates = optim.group_rates(prepared, cfg.optimizer.lr, cfg.optimizer.get("lr_decay", 1.0))
    return (
        store.flatten(resolved)
        | optim.rate_params(rates)
        | {
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
            # batch_size is per rank, as in timm: each optimiser step sees world_size times as many images.
            "world_size": distributed.world_size(),
            "batch_size_per_rank": cfg.batch_size,
            "global_batch_size": cfg.batch_size * distributed.world_size(),
        }
    )


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


def announce(prepared: models.PreparedModel, mode: Mode, checked: data.CheckedData, device) -> None:
    trainable, total = prepared.parameter_counts()
    counts = {split: len(samples) for split, samples in checked.samples.items()}
    ranks = f" x {distributed.world_size()} ranks" if distributed.world_size() > 1 else ""
    log.info(
        "%s %s on %s%s: %d classes, %d train / %d val images, %s of %s parameters train",
        *(prepared.spec.name, mode.name, device, ranks, len(checked.classes), counts["train"], counts["val"]),
        *(f"{trainable:,}", f"{total:,}"),
    )


def build_loaders(cfg: DictConfig, checked: data.CheckedData, prepared: models.PreparedModel, device) -> dict:
    """Train and val loaders, with what data.cache_mb holds between epochs: first the val split
    (its decoded images, or a frozen backbone's outputs for it), then the decoded training images."""
    budget = cfg.data.cache_mb * 2**20
    input_size = cfg.model.input_size
    val_bytes = data.replay_bytes(len(checked.samples["val"]), input_size)
    # A cached backbone output already spares the val images' decoding after the first epoch.
    replay_val = not prepared.fixed_backbone and val_bytes <= budget
    # Absent from the config of a run saved before the key existed: it resumes as it trained.
    requested = cfg.data.get("gpu_augment", False)
    gpu_augment = augment.enabled(requested, device)
    where = f"drawn in the data workers, rendered on {device}" if gpu_augment else "in the data workers"
    log.info("training crops and flips: %s (data.gpu_augment=%s)", where, str(requested).lower())
    settings = data.LoaderSettings(
        input_size=input_size,
        batch_size=cfg.batch_size,
        num_workers=runtime.worker_count(cfg.num_workers),
        seed=cfg.seed,
        pin_memory=device.type == "cuda",
        skip_bad=cfg.data.skip_bad_images,
        max_image_pixels=cfg.data.get("max_image_pixels"),
        min_train_batch=prepared.spec.min_batch_size,
        train_cache_bytes=max(0, budget - min(val_bytes, budget)),
        gpu_augment=gpu_augment,
        rank=distributed.rank(),
        world_size=distributed.world_size(),
    )
    loaders = data.build_loaders(checked.samples, settings)
    if replay_val:
        loaders["val"] = data.ReplayLoader(loaders["val"])
    return loaders


def build_training(
    cfg: DictConfig, prepared: models.PreparedModel, device, steps_per_epoch: int
) -> engine.Training:
    """Loss, optimiser, schedule, precision and memory layout around the prepared model."""
    amp_dtype = runtime.precision_for(str(cfg.precision), device)
    # auto: NHWC wherever bf16 runs, whose fast convolutions want it (resnet18 training on a CPU:
    # x1.2 in bf16); float32 convolutions measured about the same either way.
    channels_last = amp_dtype == torch.bfloat16 if cfg.channels_last == "auto" else cfg.channels_last
    layout = torch.channels_last if channels_last else torch.preserve_format
    if cfg.precision == "auto" or cfg.channels_last == "auto":
        name = {None: "float32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
        log.info("precision: %s; channels_last %s", name, channels_last)
    prepared.module.to(device, memory_format=layout)
    # Norms that learn their statistics (finetune, scratch, staged once unfrozen) compute them over
    # every rank's images. feature_extract's frozen norms keep ImageNet's statistics in eval mode:
    # the same on every rank already.
    if prepared.mode.train_backbone and distributed.sync_batchnorm(prepared.module, device):
        prepared.find_frozen_norms()  # the layers were swapped; frozen groups' ones stay in eval mode
        log.info("BatchNorm layers synchronised across ranks (SyncBatchNorm)")
    optimizer = optim.build_optimizer(cfg.optimizer, prepared)
    scheduler, per_batch = optim.build_scheduler(cfg.scheduler, optimizer, cfg.epochs, steps_per_epoch)
    return engine.Training(
        model=prepared,
        criterion=torch.nn.CrossEntropyLoss(label_smoothing=cfg.loss.label_smoothing),
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
        runtime=runtime.Runtime(device, data.Normalizer(device), amp_dtype, channels_last),
        epochs=cfg.epochs,
        scheduler_per_batch=per_batch,
        backbone_batches=backbone_batches(cfg),
        compile=cfg.get("compile", False),
    )


def backbone_batches(cfg: DictConfig) -> int | None:
    """Batches per frozen-backbone pass in training for backbone_batch_size=<images>; None: auto."""
    images = cfg.get("backbone_batch_size", "auto")
    return None if images == "auto" else max(1, images // cfg.batch_size)


class EpochRecorder:
    """After each epoch: its metrics to MLflow, a console line, and (every N epochs) a checkpoint.

    A continued run re-trains epochs after its checkpoint whose metrics MLflow may already hold
    (with checkpoint.every_epochs above 1): those steps are not logged twice.
    """

    def __init__(self, cfg: DictConfig, folder: Path, training: engine.Training, run_id: str, saved, startup):
        self.folder, self.training, self.run_id = folder, training, run_id
        self.startup = startup  # a StartupClock, recorded after the first epoch this process trains
        self.every, self.to_mlflow = cfg.checkpoint.every_epochs, cfg.checkpoint.log_to_mlflow
        self.config = checkpoint.flat_config(cfg)
        self.logged = store.logged_steps(run_id, "val_acc")
        # Every epoch's metrics, those before a resume included: each checkpoint carries them all.
        self.metrics: list[dict] = (
            list(saved.state["metrics"][: saved.state["progress"]["epoch"]]) if saved else []
        )

    def __call__(self, r: engine.EpochReport, progress: engine.Progress) -> None:
        metrics = {"train_loss": r.train.loss, "train_acc": r.train.acc, "val_loss": r.val.loss}
        metrics |= {"val_acc": r.val.acc, "epoch_seconds": r.seconds, "lr": r.lrs[HEAD_GROUP]}
        if len(r.lrs) > 1:  # layer-wise rates, and how many groups trained (staged unfreezing)
            metrics |= {f"lr_{name}": lr for name, lr in r.lrs.items() if name != HEAD_GROUP}
            metrics["trainable_groups"] = len(r.trainable)
        if self.training.model.unfreezes_at(r.epoch):
            log.info("epoch %d: unfrozen, training %s", r.epoch, ", ".join(r.trainable))
        self.metrics.append(metrics)
        epochs = self.training.epochs
        if self.every and (r.epoch % self.every == 0 or r.epoch == epochs):
            extra = {"run_id": self.run_id, "config": self.config, "metrics": self.metrics}
            checkpoint.save(self.folder, self.training, progress, extra)
            if self.to_mlflow and r.epoch == epochs:
                store.log_files(self.folder, "checkpoint", text=False)
        if r.epoch not in self.logged:
            store.log_metrics(metrics, step=r.epoch)
        self.startup.record(step=r.epoch)
        log.info(
            "epoch %*d/%d  train loss %.4f acc %.4f | val loss %.4f acc %.4f | %.1fs%s",
            *(len(str(epochs)), r.epoch, epochs, r.train.loss, r.train.acc, r.val.loss, r.val.acc),
            *(r.seconds, "  * best" if r.improved else ""),
        )


def skipped_images(checked: data.CheckedData, loaders: dict, device) -> int:
    """Images left out: unreadable headers found up front, and images that failed to decode (on
    any rank: each decodes its own shard; every rank must call this under torchrun)."""
    decoded = distributed.sum_over_ranks([sum(loader.skipped for loader in loaders.values())], device)
    return checked.skipped + int(decoded[0])


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
    distributed.plain_batchnorm(prepared.module)  # the logged model runs in one process
    model = classifier.Classifier(prepared.module, classes, spec.input_size, spec.name, spec.arch)
    image = next(iter(val_loader))[0][0].cpu()
    example = encode_jpeg(image, quality=90).numpy().tobytes()
    store.log_model(model, example, registered_name)
