"""run(cfg): one training run as a flat list of steps, the same on every torchrun rank.

Set-up turns the checked settings into objects (the data, the model, its loaders and training);
resume.py decides what a run continues, recorder.py what it records (on rank 0 alone).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from visiontune import (
    VisiontuneError,
    augment,
    checkpoint,
    config,
    data,
    distributed,
    engine,
    models,
    optim,
    recorder,
    resume,
    runtime,
    sharing,
    tasks,
)
from visiontune.config import Job, Mode, Settings
from visiontune.ema import WeightAverage

log = logging.getLogger("visiontune")


def run(cfg: DictConfig) -> float:
    """Train one configuration in one MLflow run (or continue one); returns its best val accuracy.

    Under torchrun every rank takes the same steps; rank 0 alone reads and writes the store, and
    hands the others what it decided to continue.
    """
    job = Job.from_hydra(started=recorder.startup_began())
    launch = distributed.Launch.from_env()
    device = runtime.pick_device(str(cfg.device), launch.local_rank if launch else None, job.number)
    with distributed.process_group(launch, device):
        where = None
        if distributed.is_main():
            where = recorder.Where.open(config.read_mlflow(cfg), job.launch_dir)
            restarted = launch is not None and launch.restart_count > 0
            continued = resume.decide(cfg, job, restarted, where.client, where.experiment_id)
        continued = distributed.broadcast(continued if where else None)
        if continued.finished_acc is not None:  # a resumed sweep's job (or a restart) that ran to its end
            return continued.finished_acc
        return train(cfg, job, device, recorder.for_rank(where, job, continued))


def train(cfg: DictConfig, job: Job, device: torch.device, record) -> float:
    """The run's steps: its config, the set-up, fit, the end; `record` keeps what rank 0 records."""
    saved = record.continued.saved()
    if saved:
        cfg = resume.resumed_config(saved, cfg, job.overrides)
        refuse_fewer_epochs(saved, cfg.epochs)
    with record.tracking(cfg):
        settings = config.read(cfg)  # the CLI checked a single run's values; a sweep's job is a FAILED child
        setup = set_up(settings, job, device)
        loaders = record.started(settings, cfg, setup, device)
        progress = checkpoint.restore(saved, setup.training) if saved else None
        record.resumed(saved, progress, settings.epochs)
        result = engine.fit(setup.training, loaders, epoch_ended(record), progress)
        same_on_every_rank(setup.prepared.module)
        tested = score_test_split(setup)
        record.finished(result, setup, skipped_images(setup.checked, setup.loaders, device))
        record.tested(tested, setup.checked)
        data.close(setup.loaders)
    record.done(settings)
    return result.best_acc


# Called with each epoch's report once the epoch is recorded; one that returns True ends the fit
# there, the run FINISHED with the epochs it trained: how visiontune-search prunes a trial.
EPOCH_LISTENERS: list = []


def epoch_ended(record):
    def ended(report: engine.EpochReport, progress: engine.Progress) -> bool:
        record.epoch_ended(report, progress)
        return any([listener(report) for listener in EPOCH_LISTENERS])

    return ended


def refuse_fewer_epochs(saved: checkpoint.Saved, epochs) -> None:
    """Before the run is reopened: resuming to fewer epochs than it trained would train nothing."""
    trained = saved.state["progress"]["epoch"]
    if isinstance(epochs, int) and epochs < trained:
        raise VisiontuneError(
            f"resume: the run {saved.run_id} already trained {trained} epochs; epochs={epochs} would "
            f"train none of them: give epochs=N with N > {trained} to train it further"
        )


@dataclass(frozen=True)
class SetUp:
    """What every rank builds alike: the checked data, the model, its loaders and its training."""

    checked: data.CheckedData
    prepared: models.PreparedModel
    loaders: dict
    training: engine.Training


def set_up(settings: Settings, job: Job, device: torch.device) -> SetUp:
    checked = check_data(settings.data, job.launch_dir, settings.seed)
    runtime.make_deterministic(settings.runtime.deterministic)
    torch.manual_seed(settings.seed)  # every rank starts from the same weights (DDP also copies rank 0's)
    weights = models.resolve_weights(
        settings.model.arch, settings.weights, job.launch_dir, settings.model.source
    )
    prepared = models.prepare(settings.model, settings.mode, len(checked.classes), weights)
    announce(prepared, settings.mode, checked, device)
    val_bytes = data.replay_bytes(len(checked.samples["val"]), prepared.spec.input_size)
    sharing.set_budget(settings.data.cache_bytes)  # what earlier jobs of this process left, within this one's
    shares = CacheShares.divide(settings.data.cache_bytes, val_bytes, prepared)
    loaders = build_loaders(settings, checked, prepared, device, shares)
    steps = len(loaders["train"])
    training = build_training(
        settings, prepared, device, steps, shares.backbone_bytes, loss_of(settings, checked)
    )
    mix = augment.batch_mixer(settings.augment, len(checked.classes))  # mixup / cutmix, or None
    training = dataclasses.replace(training, mix=mix)
    return SetUp(checked, prepared, loaders, training)


def loss_of(settings: Settings, checked: data.CheckedData) -> torch.nn.Module:
    """Cross-entropy, or BCE for a multi-label run; with loss.class_weights=auto, weighted by the
    training split's class frequencies (tasks.class_weights)."""
    weights = None
    if settings.optim.class_weights == "auto":
        labels = [label for _, label in checked.samples["train"]]
        weights = tasks.class_weights(labels, len(checked.classes), checked.multilabel)
        shown = ", ".join(
            f"{name} {w:.3g}" for name, w in zip(checked.classes, weights.tolist(), strict=True)
        )
        log.info("loss.class_weights=auto: %s", shown)
    return tasks.criterion(
        checked.multilabel, settings.optim.label_smoothing, weights, settings.data.threshold
    )


def score_test_split(setup: SetUp) -> tuple[dict, torch.Tensor | None] | None:
    """The best weights scored once on the test split, where the run has one (every rank: each
    scores its shard); None without a test split."""
    if "test" not in setup.loaders:
        return None
    training = setup.training
    return tasks.score(
        setup.prepared.module,
        setup.loaders["test"],
        *(training.criterion, training.runtime, setup.checked.classes, setup.checked.multilabel),
    )


def same_on_every_rank(module: torch.nn.Module) -> None:
    """Under torchrun: the trained weights checked to be identical on every rank, or the run fails."""
    if distributed.world_size() > 1:
        digest = distributed.same_weights_everywhere(module)
        log.info("final weights identical on all %d ranks (sha256 %s)", distributed.world_size(), digest)


def check_data(settings: config.DataSettings, launch_dir: Path, seed: int) -> data.CheckedData:
    """The data folder (downloaded first where it is missing and a URL is known) or CSV tables,
    split and checked."""
    if settings.tables is None:
        root = (launch_dir / settings.root).resolve()
        with distributed.main_first():  # under torchrun one rank downloads; the others find the folder
            data.prepare_root(root, settings.url, settings.md5, settings.tree_sha256)
    return data.check_data(settings, launch_dir, seed)


def announce(prepared: models.PreparedModel, mode: Mode, checked: data.CheckedData, device) -> None:
    trainable, total = prepared.parameter_counts()
    counts = {split: len(samples) for split, samples in checked.samples.items()}
    ranks = f" x {distributed.world_size()} ranks" if distributed.world_size() > 1 else ""
    test = f" / {counts['test']} test" if "test" in counts else ""
    log.info(
        "%s %s on %s%s: %d classes, %d train / %d val%s images, %s of %s parameters train",
        *(prepared.spec.name, mode.name, device, ranks, len(checked.classes), counts["train"], counts["val"]),
        *(test, f"{trainable:,}", f"{total:,}"),
    )


@dataclass(frozen=True)
class CacheShares:
    """data.cache_mb divided once, between every cache a run keeps between epochs."""

    val_replay: bool  # keep the val split's decoded images (not where a frozen backbone caches outputs)
    train_bytes: int  # the training images decoded once
    backbone_bytes: int  # a frozen backbone's outputs for the val split

    @classmethod
    def divide(cls, budget: int, val_bytes: int, prepared: models.PreparedModel) -> CacheShares:
        """The val split first (its decoded images, or a frozen backbone's outputs for it), then the
        training images. A backbone frozen for every epoch caches its outputs, which spare the val
        images' decoding too; one frozen for the first epochs only (staged) replays decoded images,
        which serve every epoch, instead of caching outputs of a few."""
        val_share = min(val_bytes, budget)
        if prepared.fixed_backbone:
            return cls(val_replay=False, train_bytes=budget - val_share, backbone_bytes=val_share)
        replay = val_bytes <= budget
        return cls(val_replay=replay, train_bytes=budget - (val_share if replay else 0), backbone_bytes=0)


def build_loaders(
    settings: Settings, checked: data.CheckedData, prepared: models.PreparedModel, device, shares: CacheShares
) -> dict:
    """Train and val loaders, the latter replaying its decoded images where `shares` says so."""
    requested = settings.data.gpu_augment
    gpu_augment = augment.enabled(requested, device)
    where = augment.describe(settings.augment, gpu_augment, device)
    log.info("training augmentation: %s (data.gpu_augment=%s)", where, str(requested).lower())
    loader_settings = data.LoaderSettings(
        input_size=prepared.spec.input_size,
        batch_size=settings.batch_size,
        num_workers=runtime.worker_count(settings.runtime.num_workers),
        seed=settings.seed,
        pin_memory=device.type == "cuda",
        skip_bad=settings.data.skip_bad_images,
        max_image_pixels=settings.data.max_image_pixels,
        min_train_batch=prepared.spec.min_batch_size,
        train_cache_bytes=shares.train_bytes,
        gpu_augment=gpu_augment,
        augment=settings.augment,
        rank=distributed.rank(),
        world_size=distributed.world_size(),
        sampler=settings.data.sampler,
        num_labels=len(checked.classes) if checked.multilabel else 0,
    )
    loaders = data.build_loaders(checked.samples, loader_settings)
    # An earlier job of this process replayed the same val batches: take them (sharing.py), also
    # where a frozen backbone caches its outputs instead (its first pass then decodes nothing).
    if shares.val_replay or sharing.get(loaders["val"].identity) is not None:
        loaders["val"] = data.ReplayLoader(loaders["val"])
    return loaders


def build_training(
    settings: Settings,
    prepared: models.PreparedModel,
    device,
    steps_per_epoch: int,
    backbone_cache_bytes: int,
    criterion: torch.nn.Module | None = None,
) -> engine.Training:
    """Loss, optimiser, schedule, precision and memory layout around the prepared model."""
    amp_dtype, channels_last = runtime.precision_and_layout(
        settings.runtime.precision, settings.runtime.channels_last, device
    )
    layout = torch.channels_last if channels_last else torch.preserve_format
    prepared.module.to(device, memory_format=layout)
    # Norms that learn their statistics (finetune, scratch, staged once unfrozen) compute them over
    # every rank's images. feature_extract's frozen norms keep ImageNet's statistics in eval mode:
    # the same on every rank already.
    if prepared.mode.train_backbone and distributed.sync_batchnorm(prepared.module, device):
        prepared.find_frozen_norms()  # the layers were swapped; frozen groups' ones stay in eval mode
        log.info("BatchNorm layers synchronised across ranks (SyncBatchNorm)")
    optimizer = optim.build_optimizer(settings.optim, prepared)
    loop = settings.loop
    steps_per_epoch = -(-steps_per_epoch // loop.accumulate_batches)  # optimiser steps: batches / N, up
    scheduler = optim.build_scheduler(settings.optim, optimizer, settings.epochs, steps_per_epoch)
    return engine.Training(
        model=prepared,
        criterion=(criterion or tasks.criterion(False, settings.optim.label_smoothing, None)).to(device),
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
        runtime=runtime.Runtime(
            device, data.Normalizer(device, prepared.spec.mean, prepared.spec.std), amp_dtype, channels_last
        ),
        epochs=settings.epochs,
        scheduler_per_batch=settings.optim.per_batch,
        backbone_batches=backbone_batches(settings),
        backbone_cache_bytes=backbone_cache_bytes,
        compile=settings.runtime.compile,
        ema=WeightAverage(prepared.module, loop.ema.decay) if loop.ema.on else None,
        accumulate_batches=loop.accumulate_batches,
        clip_grad_norm=loop.clip_grad_norm,
        patience=loop.early_stopping.patience,
        min_delta=loop.early_stopping.min_delta,
        seed=settings.seed,
    )


def backbone_batches(settings: Settings) -> int | None:
    """Batches per frozen-backbone pass in training for backbone_batch_size=<images>; None: auto."""
    images = settings.runtime.backbone_batch_size
    return None if images == "auto" else max(1, images // settings.batch_size)


def skipped_images(checked: data.CheckedData, loaders: dict, device) -> int:
    """Images left out: unreadable headers found up front, and images that failed to decode (on
    any rank: each decodes its own shard; every rank must call this under torchrun)."""
    decoded = distributed.sum_over_ranks([sum(loader.skipped for loader in loaders.values())], device)
    return checked.skipped + int(decoded[0])
