"""The optimiser and schedule of a run: one parameter group per layer group, each at its own rate.

`optimizer.lr` is the head's rate; `optimizer.lr_decay` scales each earlier group's by one more
factor (fastai's discriminative rates, geometric from the head down). Norm and bias parameters
can go without weight decay. A schedule says whether it steps per epoch or per batch
(`scheduler.interval`), and the per-batch ones (one-cycle) learn the run's number of steps.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from hydra.utils import instantiate

from visiontune import VisiontuneError

if TYPE_CHECKING:
    from visiontune.config import OptimSettings
    from visiontune.models import PreparedModel

log = logging.getLogger("visiontune")
MIN_ONE_CYCLE_STEPS = 4  # 2 to warm up, 2 to anneal


def group_rates(prepared: PreparedModel, lr: float, lr_decay: float) -> dict[str, float]:
    """Each layer group that trains in some epoch, with its rate: lr at the head, times lr_decay
    once more for each group below it."""
    names = tuple(prepared.groups)
    names = names[names.index(prepared.mode.trainable_from) :]  # all that train once fully unfrozen
    return {name: lr * lr_decay ** (len(names) - 1 - i) for i, name in enumerate(names)}


def build_optimizer(settings: OptimSettings, prepared: PreparedModel) -> torch.optim.Optimizer:
    """The configured torch optimiser over every group that ever trains, each at its own rate.

    Groups still frozen are in it from the start (their gradients are None until they unfreeze,
    which every torch optimiser skips), so a staged run keeps one optimiser and one schedule.
    """
    param_groups = []
    for name, lr in group_rates(prepared, settings.lr, settings.lr_decay).items():
        params = prepared.groups[name]
        # Norm weights and biases are 1-d: decaying them pulls scales and offsets to 0 for no gain.
        kept = [p for p in params if settings.decay_norm_and_bias or p.ndim > 1]
        spared = [p for p in params if not (settings.decay_norm_and_bias or p.ndim > 1)]
        param_groups.append({"params": kept, "lr": lr, "name": name})
        if spared:
            param_groups.append({"params": spared, "lr": lr, "name": name, "weight_decay": 0.0})
    return instantiate(dict(settings.optimizer))(params=[g for g in param_groups if g["params"]])


def build_scheduler(
    settings: OptimSettings, optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The configured schedule (a per-batch one learns the run's number of steps); None: scheduler=none."""
    if settings.scheduler is None:
        return None
    extra = {"total_steps": epochs * steps_per_epoch} if settings.per_batch else {}
    return instantiate(dict(settings.scheduler))(optimizer=optimizer, **extra)


def one_cycle(
    optimizer: torch.optim.Optimizer, total_steps: int, **settings
) -> torch.optim.lr_scheduler.OneCycleLR:
    """torch's OneCycleLR peaking at each group's own rate (so layer-wise rates keep their spread);
    `settings` (pct_start, div_factor, ...) as conf/scheduler/onecycle.yaml gives them."""
    max_lr = [group["lr"] for group in optimizer.param_groups]
    if total_steps < MIN_ONE_CYCLE_STEPS:
        raise VisiontuneError(
            f"scheduler=onecycle needs at least {MIN_ONE_CYCLE_STEPS} training steps, this run has "
            f"{total_steps} (epochs x batches per epoch): raise epochs, lower batch_size, or use "
            f"another scheduler"
        )
    # torch divides by the warm-up's length in steps less one: a short run needs 2 steps of it.
    pct_start = settings.pop("pct_start", 0.3)
    if pct_start * total_steps < 2:
        log.warning(
            "onecycle: %d steps in all, so the warm-up takes 2 of them (pct_start=%g asked)",
            total_steps,
            pct_start,
        )
        pct_start = 2 / total_steps
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr, total_steps, pct_start=pct_start, **settings
    )


def cosine(
    optimizer: torch.optim.Optimizer,
    epochs: int,
    warmup_epochs: int = 0,
    warmup_start_factor: float = 0.1,
    final_factor: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay from each group's rate to final_factor times it, after an optional linear
    warm-up from warmup_start_factor times it; stepped once per epoch."""

    def factor(epoch: int) -> float:
        if epoch < warmup_epochs:
            return warmup_start_factor + (1 - warmup_start_factor) * epoch / warmup_epochs
        progress = (epoch - warmup_epochs) / max(1, epochs - warmup_epochs)
        return final_factor + (1 - final_factor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def rate_params(rates: Mapping[str, float]) -> dict[str, float]:
    """Each group's rate, as run params: lr.head, lr.late, ... (0.001 * 0.3**3 reads 2.7e-05)."""
    return {f"lr.{name}": float(f"{rate:.6g}") for name, rate in rates.items()}
