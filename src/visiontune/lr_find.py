"""The learning-rate range test (fastai's lr_find): train briefly at exponentially rising rates, suggest one.

One training batch per rate, from `start_lr` to `end_lr`; the loss is smoothed exponentially
(debiased, as fastai's) and the test stops once the smoothed loss exceeds `diverge` times its
lowest value, or turns nan. The suggestion is fastai's `minimum`: the rate of the lowest smoothed
loss, divided by 10 (the steepest descent is reported beside it: on short, noisy curves it often
lands on an early dip). Model, optimiser and gradient scaler are restored afterwards: the test
leaves no trained weights behind.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from visiontune import engine

if TYPE_CHECKING:
    from visiontune.config import RangeTestSettings


@dataclass(frozen=True)
class RangeTest:
    """What the range test found: each rate tried with its smoothed loss, and the rates it suggests."""

    lrs: list[float]  # optimizer.lr's value (the head's rate) at each step
    losses: list[float]  # the smoothed training loss after each step
    suggested: float  # the rate of the lowest smoothed loss / 10
    steepest: float  # the rate where the smoothed loss fell fastest
    diverged: bool  # stopped before its last step: the loss blew up


def rates(settings: RangeTestSettings) -> list[float]:
    """The test's rates: `steps` of them, spaced exponentially from start_lr to end_lr."""
    ratio = settings.end_lr / settings.start_lr
    return [settings.start_lr * ratio ** (i / (settings.steps - 1)) for i in range(settings.steps)]


def run(training: engine.Training, loader, settings: RangeTestSettings) -> RangeTest:
    """The range test on `training`'s model and optimiser (every layer group at its own ratio to
    the head's rate), which get their states back at the end, whatever happens."""
    saved = _states(training)
    try:
        lrs, losses, diverged = _sweep(training, loader, settings)
    finally:
        _restore(training, saved)
    suggested, steepest = suggestions(lrs, losses)
    return RangeTest(lrs, losses, suggested, steepest, diverged)


def _sweep(training: engine.Training, loader, settings: RangeTestSettings) -> tuple[list, list, bool]:
    optimizer, scaler, runtime = training.optimizer, training.scaler, training.runtime
    head = max(group["lr"] for group in optimizer.param_groups)
    ratios = [group["lr"] / head for group in optimizer.param_groups]
    model = training.model
    model.train_mode()
    average, lowest, lrs, losses = 0.0, math.inf, [], []
    for step, (lr, (images, labels)) in enumerate(zip(rates(settings), _batches(loader), strict=False)):
        for group, ratio in zip(optimizer.param_groups, ratios, strict=True):
            group["lr"] = lr * ratio
        images, labels = runtime.inputs(images, labels)
        with runtime.autocast():
            _, loss = engine.training_loss(model.spec, model.module, (images,), labels, training.criterion)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        average = settings.smoothing * average + (1 - settings.smoothing) * loss.item()
        smoothed = average / (1 - settings.smoothing ** (step + 1))
        if not math.isfinite(smoothed) or smoothed > settings.diverge * lowest:
            return lrs, losses, True
        lrs.append(lr)
        losses.append(smoothed)
        lowest = min(lowest, smoothed)
    return lrs, losses, False


def _batches(loader):
    """The training loader's batches, epoch after epoch, for as long as the test takes them."""
    epoch = 0
    while True:
        epoch += 1
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader


def suggestions(lrs: list[float], losses: list[float]) -> tuple[float, float]:
    """(minimum / 10, steepest descent) over the curve with its first tenth and last 5 points left
    out, as fastai does: the start is mostly smoothing warming up, the end the blow-up. The steepest
    descent is looked for on the way down to the minimum: past it, a noisy blow-up has dips too."""
    if len(lrs) < 2:
        raise ValueError("the range test diverged at once: no curve to suggest a rate from")
    trim = slice(len(lrs) // 10, -5) if len(lrs) >= 20 else slice(None)
    kept_lrs, kept = np.array(lrs[trim]), np.array(losses[trim])
    lowest = int(kept.argmin())
    minimum = float(kept_lrs[lowest]) / 10
    upto = max(lowest + 1, 2)
    slopes = np.diff(kept[:upto]) / np.diff(np.log(kept_lrs[:upto]))
    steepest = float(kept_lrs[slopes.argmin() + 1])
    return minimum, steepest


def _states(training: engine.Training) -> dict:
    """Copies of what the test changes (state_dict and optimiser state hold references)."""
    return copy.deepcopy(
        {
            "model": training.model.module.state_dict(),
            "optimizer": training.optimizer.state_dict(),
            "scaler": training.scaler.state_dict(),
            "rng": torch.get_rng_state(),
        }
    )


def _restore(training: engine.Training, saved: dict) -> None:
    training.model.module.load_state_dict(saved["model"])
    training.optimizer.load_state_dict(saved["optimizer"])
    training.scaler.load_state_dict(saved["scaler"])
    torch.set_rng_state(saved["rng"])
    training.optimizer.zero_grad(set_to_none=True)


def figure(test: RangeTest):
    """The smoothed loss against the rate (log scale), both suggestions marked. A plain Figure, as
    report.py's evaluation figures: nothing left in pyplot's registry."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.subplots()
    ax.plot(test.lrs, test.losses)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (optimizer.lr)")
    ax.set_ylabel("training loss (smoothed)")
    ax.axvline(
        test.suggested, color="tab:red", linestyle="--", label=f"suggested {test.suggested:.2g} (min/10)"
    )
    ax.axvline(test.steepest, color="tab:gray", linestyle=":", label=f"steepest {test.steepest:.2g}")
    ax.legend()
    ax.set_title("Learning-rate range test")
    fig.tight_layout()
    return fig
