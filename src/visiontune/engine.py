"""The training loop: train_one_epoch, evaluate and fit over them. Plain functions, no config inside."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from visiontune import VisiontuneError, distributed
from visiontune.frozen import BackboneCache, FrozenBackbone
from visiontune.runtime import Runtime

log = logging.getLogger("visiontune")

if TYPE_CHECKING:
    from visiontune.ema import WeightAverage
    from visiontune.models import PreparedModel


@dataclass(frozen=True)
class PhaseResult:
    loss: float
    acc: float | None  # None: training on mixed batches (mixup/cutmix), whose labels are no single class
    seconds: float
    first_nonfinite_batch: int | None = None  # 1-based: the first batch whose loss was nan or inf
    batches: int = 0
    extra: dict = field(default_factory=dict)  # multi-label: mAP, micro_f1, macro_f1 (acc is mAP)
    top5: float | None = None  # the label among the 5 highest logits; None with 5 classes or fewer


class NonFiniteLoss(VisiontuneError):
    """Training diverged: no model from this epoch on may be kept."""


@dataclass(frozen=True)
class Training:
    """What fit needs to train: the prepared model, its loss, optimiser and schedule, where, how long."""

    model: PreparedModel
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    scaler: torch.amp.GradScaler
    runtime: Runtime
    epochs: int
    scheduler_per_batch: bool = False  # OneCycleLR-like schedules step after every batch
    # Batches a frozen backbone (feature_extract) runs at once in training; None: sized to the
    # device on the first batch (batches_per_pass). The steps stay one per batch either way.
    backbone_batches: int | None = None
    # The val split's frozen-backbone outputs kept between epochs: pipeline's share of data.cache_mb.
    backbone_cache_bytes: int = 0
    compile: bool = False  # torch.compile what the training step and validation call
    ema: WeightAverage | None = None  # a moving average of the weights, validated beside them
    accumulate_batches: int = 1  # batches whose gradients add up to one optimiser step
    clip_grad_norm: float | None = None  # the gradients' total norm is scaled down to this
    patience: int = 0  # early stopping: epochs without an improvement above min_delta; 0: never
    min_delta: float = 0.0
    # mixup/cutmix: (images, labels, generator) -> (images, soft targets (N, C) summing to 1 per row).
    # The generator is a CPU torch.Generator seeded from (seed, epoch, batch, rank): resume stays exact.
    mix: Callable | None = None
    seed: int = 0

    def learning_rates(self) -> dict[str, float]:
        """The rate of each layer group the optimiser holds (its parameter groups' `name`)."""
        return {group.get("name", str(i)): group["lr"] for i, group in enumerate(self.optimizer.param_groups)}


class _Tally:
    """Loss and accuracy summed on the device; read back once per phase, not once per batch."""

    def __init__(self, device: torch.device, criterion: nn.Module | None = None):
        self.threshold = getattr(criterion, "threshold", 0.5)  # multi-label: F1's threshold (tasks.py)
        self.loss = torch.zeros((), device=device)  # float32: MPS has no float64
        self.correct = torch.zeros((), device=device, dtype=torch.int64)
        self.top5 = torch.zeros((), device=device, dtype=torch.int64)
        self.scored = 0  # images with one true class (not mixed): what accuracy is over
        self.classes = 0
        # The first batch with a non-finite loss, kept on the device: checking each batch on the
        # host would stop a GPU once per batch.
        self.first_bad = torch.full((), -1, device=device, dtype=torch.int64)
        self.count = 0
        self.batches = 0
        self.kept: list = []  # multi-label: (probabilities, targets) per batch, for the phase's mAP

    def add(
        self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, scored: bool = True
    ) -> None:
        """One batch; `scored=False` (a mixed batch) counts its loss but not its accuracy."""
        self.batches += 1
        loss = loss.detach()
        self.loss += loss * labels.shape[0]
        self.count += labels.shape[0]
        if labels.dim() > 1:  # multi-hot targets: scored over the whole phase (tasks.py), not per image
            self.kept.append((torch.sigmoid(logits.detach().float()).cpu(), labels.cpu()))
        elif scored:
            self.correct += (logits.argmax(dim=1) == labels).sum()
            self.classes = logits.shape[1]
            if self.classes > 5:
                self.top5 += (logits.topk(5, dim=1).indices == labels[:, None]).any(dim=1).sum()
            self.scored += labels.shape[0]
        first = (self.first_bad < 0) & ~torch.isfinite(loss)
        self.first_bad = torch.where(first, self.batches, self.first_bad)

    def result(self, seconds: float) -> PhaseResult:
        """Mean loss and accuracy of the phase; under torchrun over every rank's images, reduced
        here once per phase (sums, then the first bad batch), not once per batch."""
        device = self.loss.device
        loss, correct, top5, count, scored = distributed.sum_over_ranks(
            [self.loss.item(), self.correct.item(), self.top5.item(), self.count, self.scored], device
        )
        first_bad = int(self.first_bad.item())
        first_bad = distributed.min_over_ranks(first_bad if first_bad > 0 else math.inf, device)
        extra = self._multilabel(device)
        return PhaseResult(
            loss / max(count, 1),
            extra["mAP"] if extra else (correct / scored if scored else None),
            seconds,
            first_nonfinite_batch=int(first_bad) if first_bad < math.inf else None,
            batches=self.batches,
            extra=extra,
            top5=top5 / scored if scored and self.classes > 5 else None,
        )

    def _multilabel(self, device) -> dict[str, float]:
        """A multi-label phase's mAP and F1s; under torchrun the mean of the ranks' (the same on each)."""
        if not self.kept:
            return {}
        from visiontune import tasks

        scores, targets = (torch.cat(part) for part in zip(*self.kept, strict=True))
        metrics = tasks.multilabel_metrics(scores, targets, self.threshold)
        summed = distributed.sum_over_ranks(list(metrics.values()), device)
        return {key: value / distributed.world_size() for key, value in zip(metrics, summed, strict=True)}


def train_one_epoch(
    training: Training,
    loader,
    epoch: int = 1,
    frozen: FrozenBackbone | None = None,
    trained: nn.Module | None = None,
    per_pass: int = 1,
) -> PhaseResult:
    """One optimisation pass over `loader`, one step per `accumulate_batches` batches; with
    `frozen`, the backbone runs apart from the head, on `per_pass` batches at a time.

    `trained` is what the forward pass goes through: the model (or, with `frozen`, its `rest`),
    or that inside DistributedDataParallel. With `training.mix`, each batch is mixed first and its
    accuracy is left out (its soft targets name no single class); its loss is counted.
    """
    model, runtime = training.model, training.runtime
    if trained is None:
        trained = frozen.rest if frozen is not None else model.module
    start = _clock(runtime.device)
    model.train_mode()
    tally = _Tally(runtime.device, training.criterion)
    batches = frozen.batches(loader, runtime, per_pass) if frozen is not None else _whole(loader, runtime)
    steps = _Steps(training, trained, len(loader))
    shown = tqdm(batches, desc=f"epoch {epoch} train", total=len(loader), leave=False, disable=None)
    for index, (inputs, labels) in enumerate(shown):
        mixed, targets = (
            _mixed(training, inputs, labels, (epoch, index)) if training.mix else (inputs, labels)
        )
        with steps.syncing(index):  # DDP reduces the gradients on a step's last batch alone
            with runtime.autocast():
                logits, loss = training_loss(model.spec, trained, mixed, targets, training.criterion)
            training.scaler.scale(loss / steps.share(index)).backward()
        steps.after(index)
        tally.add(loss, logits, labels, scored=training.mix is None)
    steps.finish()
    return tally.result(_clock(runtime.device) - start)


class _Steps:
    """Batches grouped into optimiser steps, `accumulate_batches` at a time (the epoch's last step
    may take fewer): each batch's loss is divided by its step's batch count, so that the summed
    gradients are those of the mean loss over the step's images (for batches of equal size)."""

    def __init__(self, training: Training, trained: nn.Module, batches: int):
        self.training, self.trained, self.batches = training, trained, batches
        self.every = training.accumulate_batches
        self.pending = False  # gradients added since the last step
        training.optimizer.zero_grad(set_to_none=True)

    def share(self, index: int) -> int:
        first = index - index % self.every
        return max(1, min(self.every, self.batches - first))

    def _ends_step(self, index: int) -> bool:
        return (index + 1) % self.every == 0 or index + 1 >= self.batches

    def syncing(self, index: int):
        no_sync = getattr(self.trained, "no_sync", None)  # DistributedDataParallel's
        return contextlib.nullcontext() if no_sync is None or self._ends_step(index) else no_sync()

    def after(self, index: int) -> None:
        self.pending = True
        if self._ends_step(index):
            self.step()

    def finish(self) -> None:
        """A step for gradients left over (a loader that gave fewer batches than its length)."""
        if self.pending:
            self.step()

    def step(self) -> None:
        """Unscale (fp16) and clip, step, then the moving average and a per-batch schedule."""
        training = self.training
        if training.clip_grad_norm is not None:
            training.scaler.unscale_(training.optimizer)  # clip the true gradients, not scaled ones
            params = [p for group in training.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], training.clip_grad_norm)
        training.scaler.step(training.optimizer)
        training.scaler.update()
        training.optimizer.zero_grad(set_to_none=True)
        self.pending = False
        if training.ema is not None:
            training.ema.update(training.model.module)
        if training.scheduler_per_batch:
            training.scheduler.step()


def _mixed(training: Training, inputs: tuple, labels: torch.Tensor, at: tuple[int, int]) -> tuple:
    """(inputs with their images mixed, soft targets) for the batch `at` = (epoch, index), drawn
    from a generator of its own: the same draws whatever came before, so a resumed run repeats them."""
    state = np.random.SeedSequence([training.seed, *at, distributed.rank()]).generate_state(2)
    generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    images, targets = training.mix(inputs[0], labels, generator)
    return (images, *inputs[1:]), targets


def _whole(loader, runtime: Runtime):
    """(model inputs, labels) per batch, for a model called whole."""
    for images, labels in loader:
        images, labels = runtime.inputs(images, labels)
        yield (images,), labels


def training_loss(
    spec, module: nn.Module, inputs: tuple, labels, criterion
) -> tuple[torch.Tensor, torch.Tensor]:
    """(main logits, loss). A model with an auxiliary head returns its logits too in training."""
    if spec.aux_head is None:
        logits = module(*inputs)
        return logits, criterion(logits, labels)
    logits, aux_logits = module(*inputs)
    loss = criterion(logits, labels)
    if spec.aux_loss_weight:
        loss = loss + spec.aux_loss_weight * criterion(aux_logits, labels)
    return logits, loss


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    criterion: nn.Module,
    runtime: Runtime,
    desc: str = "val",
    cache: BackboneCache | None = None,
) -> PhaseResult:
    """Loss and accuracy of the main head over a whole loader, in eval mode.

    With a BackboneCache, the layers below the head run on the first call only.
    """
    start = _clock(runtime.device)
    model.eval()
    tally = _Tally(runtime.device, criterion)
    batches = cache.logits(loader, runtime) if cache else _logits(model, loader, runtime)
    for logits, labels in tqdm(batches, desc=desc, total=len(loader), leave=False, disable=None):
        with runtime.autocast():
            loss = criterion(logits, labels)
        tally.add(loss, logits, labels)
    return tally.result(_clock(runtime.device) - start)


def _logits(model: nn.Module, loader, runtime: Runtime):
    for images, labels in loader:
        images, labels = runtime.inputs(images, labels)
        with runtime.autocast():
            yield model(images), labels


@dataclass(frozen=True)
class EpochReport:
    epoch: int
    train: PhaseResult
    val: PhaseResult
    lrs: dict[str, float]  # each layer group's rate as the epoch began
    seconds: float
    improved: bool
    trainable: tuple[str, ...] = ()  # the layer groups that trained
    val_ema: PhaseResult | None = None  # the moving average of the weights, validated (ema.decay)


RAW, EMA = "weights", "ema"  # which weights an epoch's best accuracy came from


@dataclass(frozen=True)
class FitResult:
    best_acc: float
    best_epoch: int
    val_curve: list[float]
    best_from: str = RAW  # RAW or EMA: which of the best epoch's weights the model is
    stopped_early: str | None = None  # why fit ended before its last epoch (early stopping)


@dataclass
class Progress:
    """Where a fit stands after its last finished epoch: what a checkpoint keeps, and resumes from."""

    epoch: int = 0
    best_acc: float = -1.0
    best_epoch: int = 0
    best_state: dict | None = None  # a CPU copy of the weights of the best epoch
    curve: list[float] = field(default_factory=list)  # val accuracy per epoch
    best_from: str = RAW
    # Early stopping: the monitored accuracy to beat by more than min_delta, and the epochs since it was.
    watched: float = -1.0
    waited: int = 0


@distributed.peer_loss_as_interrupt()  # under torchrun: another rank died, this run is KILLED
def fit(
    training: Training,
    loaders: dict,
    on_epoch: Callable[[EpochReport, Progress], bool | None] = lambda report, progress: None,
    progress: Progress | None = None,
) -> FitResult:
    """Train and validate each epoch after `progress`; end with the weights of the best val accuracy
    (those of the moving average where it scored higher), or earlier where early stopping says so.

    Each epoch first applies the mode's plan for it (what trains). While the backbone is fixed,
    it runs apart from the head, and evaluation caches its output, up to `training.backbone_cache_bytes`.
    """
    module = training.model.module
    progress = progress or Progress()
    # Mixed images must go through the whole model: the frozen stem would see them unmixed.
    phases = _Phases(training.model, training.backbone_cache_bytes, training.compile, training.mix is None)
    stopped = None
    for epoch in range(progress.epoch + 1, training.epochs + 1):
        report = _epoch(training, loaders, phases, epoch, progress)
        if on_epoch(report, progress):  # True: stop here (a search's pruner), with the best epoch so far
            break
        if stopped := _stop_reason(training, progress):
            log.info("%s", stopped)
            break
    # Under torchrun the last epoch's weights must agree on every rank: the best epoch's may agree
    # only because it came before a stage whose gradients went unreduced.
    if distributed.world_size() > 1:
        distributed.same_weights_everywhere(module)
        if training.ema is not None:
            distributed.same_weights_everywhere(training.ema.module)
    module.load_state_dict(progress.best_state)
    return FitResult(progress.best_acc, progress.best_epoch, progress.curve, progress.best_from, stopped)


def _epoch(training: Training, loaders: dict, phases: _Phases, epoch: int, progress: Progress) -> EpochReport:
    """Train `epoch`, validate the weights (and their moving average), step an epoch's schedule."""
    prepared, module, runtime = training.model, training.model.module, training.runtime
    tic = time.perf_counter()
    split, cache, trained = phases.for_epoch(prepared.enter_epoch(epoch))
    if prepared.unfreezes_at(epoch):  # said as the epoch starts, before its long wait
        log.info("epoch %d: unfrozen, training %s", epoch, ", ".join(prepared.trainable))
    lrs = training.learning_rates()
    if hasattr(loaders["train"], "set_epoch"):
        loaders["train"].set_epoch(epoch)
    per_pass = training.backbone_batches or (split.per_pass if split else None)
    tr = train_one_epoch(training, loaders["train"], epoch, split, trained, per_pass)
    distributed.average_norm_statistics(module)  # validation and checkpoints see the same ones
    if training.ema is not None:
        training.ema.end_epoch(module)
    if tr.first_nonfinite_batch is not None:
        raise NonFiniteLoss(_divergence(tr, epoch, lrs, runtime.amp_dtype == torch.float16))
    val = loaders["val"]
    va = evaluate(phases.evaluated, val, training.criterion, runtime, f"epoch {epoch} val", cache)
    va_ema = None
    if training.ema is not None:
        va_ema = evaluate(training.ema.module, val, training.criterion, runtime, f"epoch {epoch} val ema")
    if training.scheduler is not None and not training.scheduler_per_batch:
        training.scheduler.step()
    improved = _advance(progress, epoch, (va, module), (va_ema, training.ema), training.min_delta)
    return EpochReport(
        epoch=epoch,
        train=tr,
        val=va,
        lrs=lrs,
        seconds=time.perf_counter() - tic,
        improved=improved,
        trainable=prepared.trainable,
        val_ema=va_ema,
    )


def _advance(progress: Progress, epoch: int, raw: tuple, averaged: tuple, min_delta: float) -> bool:
    """`progress` moved past `epoch`; True where it reached the best val accuracy yet.

    `raw` and `averaged` are (val result, module) for the weights and their moving average
    (None, None without one): the higher accuracy of the two is the epoch's, the weights first on a tie.
    """
    (result, module), (ema_result, ema) = raw, averaged
    acc, source = result.acc, RAW
    if ema_result is not None and ema_result.acc > acc:
        acc, source, module = ema_result.acc, EMA, ema.module
    improved = acc > progress.best_acc
    if improved:
        # A CPU copy: the next epoch's updates must not reach it.
        progress.best_state = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
        progress.best_acc, progress.best_epoch, progress.best_from = acc, epoch, source
    if acc > progress.watched + min_delta:
        progress.watched, progress.waited = acc, 0
    else:
        progress.waited += 1
    progress.epoch = epoch
    progress.curve.append(result.acc)
    return improved


def _stop_reason(training: Training, progress: Progress) -> str | None:
    """Why fit stops after the epoch `progress` ended (early stopping), or None to go on."""
    if not training.patience or progress.waited < training.patience or progress.epoch >= training.epochs:
        return None
    return (
        f"early stopping after epoch {progress.epoch} of {training.epochs}: val accuracy did not improve "
        f"by more than {training.min_delta:g} in {progress.waited} epochs (best {progress.best_acc:.4f} "
        f"at epoch {progress.best_epoch})"
    )


class _Phases:
    """What an epoch trains through, for what trains in it: the frozen backbone's split and its
    evaluation cache while the backbone is fixed, and (under torchrun) DDP around what trains."""

    def __init__(self, prepared: PreparedModel, cache_bytes: int, compile: bool = False, split: bool = True):
        self.prepared, self.cache_bytes, self.compile = prepared, cache_bytes, compile
        self.split = split  # False: training calls the whole model even while the backbone is fixed
        self.backbone: FrozenBackbone | None = None
        self.cache: BackboneCache | None = None
        self.trained: nn.Module | None = None
        # What validation calls without a cache: torch.compile keeps a graph per mode, eval's too.
        self.evaluated = self._compiled(prepared.module)

    def _compiled(self, module: nn.Module) -> nn.Module:
        return torch.compile(module) if self.compile else module

    def for_epoch(self, changed: bool) -> tuple[FrozenBackbone | None, BackboneCache | None, nn.Module]:
        """(training split, evaluation cache, module the training step calls) for the epoch entered
        last, whose trainable groups `changed` from the epoch before. Once the backbone trains the
        split and cache are dropped (its features no longer hold), and DDP is wrapped anew: it
        reduces the gradients of the parameters that trained when it was made."""
        prepared, spec = self.prepared, self.prepared.spec
        split = None
        if not prepared.cache_backbone:
            self.cache = None
        else:
            if self.backbone is None:
                self.backbone = FrozenBackbone(prepared.module, spec.heads)
                self.backbone.train_stem = self._compiled(self.backbone.train_stem)
                self.cache = BackboneCache(self.backbone, self.cache_bytes)
            split = self.backbone if self.split else None
        if changed or self.trained is None:
            self.trained = None  # the earlier wrapper lets go of its gradient hooks first
            # An auxiliary head that the loss ignores gets no gradient.
            self.trained = self._compiled(
                distributed.data_parallel(
                    split.rest if split else prepared.module,
                    find_unused_parameters=spec.aux_head is not None and not spec.aux_loss_weight,
                )
            )
        return split, self.cache, self.trained


def _divergence(result: PhaseResult, epoch: int, lrs: dict[str, float], fp16: bool) -> str:
    # Under autocast the loss itself is float32: a non-finite one means the forward pass
    # overflowed or the weights diverged, which the gradient scaler cannot undo.
    advice = f"lower optimizer.lr (it is {max(lrs.values()):g})" + (
        ", or use precision=off (float16 overflowed)" if fp16 else ""
    )
    where = f"first at batch {result.first_nonfinite_batch} of {result.batches}"
    return (
        f"the training loss became {result.loss:g} in epoch {epoch}, {where}: the run stops and keeps "
        f"no model from it; {advice}"
    )


def _clock(device: torch.device) -> float:
    # CUDA runs asynchronously: wait for it so phase times are real.
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
