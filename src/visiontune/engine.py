"""One pass over a loader: train_one_epoch and evaluate. Plain functions, no config inside."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from visiontune.models import set_train_mode


@dataclass(frozen=True)
class Runtime:
    """Where and how tensors are computed: device, autocast dtype, memory layout."""

    device: torch.device
    normalize: Callable[[torch.Tensor], torch.Tensor]
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def inputs(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        images = self.normalize(images.to(self.device, non_blocking=True))
        return images.contiguous(memory_format=fmt), labels.to(self.device, non_blocking=True)


@dataclass(frozen=True)
class PhaseResult:
    loss: float
    acc: float
    seconds: float


class _Tally:
    """Loss and accuracy summed on the device; read back once per phase, not once per batch."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device, dtype=torch.float64)
        self.correct = torch.zeros((), device=device, dtype=torch.int64)
        self.count = 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss += loss.detach() * labels.numel()
        self.correct += (logits.argmax(dim=1) == labels).sum()
        self.count += labels.numel()

    def result(self, seconds: float) -> PhaseResult:
        count = max(self.count, 1)
        return PhaseResult(self.loss.item() / count, self.correct.item() / count, seconds)


def train_one_epoch(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    runtime: Runtime,
    scaler: torch.amp.GradScaler,
    aux_loss_weight: float = 0.0,
    frozen_norms: Sequence[nn.Module] = (),
    desc: str = "train",
) -> PhaseResult:
    """One optimisation pass. With aux_loss_weight > 0 the model returns (logits, aux_logits)."""
    start = _clock(runtime.device)
    set_train_mode(model, frozen_norms)
    tally = _Tally(runtime.device)
    for images, labels in tqdm(loader, desc=desc, leave=False, disable=None):
        images, labels = runtime.inputs(images, labels)
        with runtime.autocast():
            if aux_loss_weight:
                logits, aux_logits = model(images)
                loss = criterion(logits, labels) + aux_loss_weight * criterion(aux_logits, labels)
            else:
                logits = model(images)
                loss = criterion(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        tally.add(loss, logits, labels)
    return tally.result(_clock(runtime.device) - start)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    criterion: nn.Module,
    runtime: Runtime,
    desc: str = "val",
) -> PhaseResult:
    """Loss and accuracy of the main head over a whole loader, in eval mode."""
    start = _clock(runtime.device)
    model.eval()
    tally = _Tally(runtime.device)
    for images, labels in tqdm(loader, desc=desc, leave=False, disable=None):
        images, labels = runtime.inputs(images, labels)
        with runtime.autocast():
            logits = model(images)
            loss = criterion(logits, labels)
        tally.add(loss, logits, labels)
    return tally.result(_clock(runtime.device) - start)


def _clock(device: torch.device) -> float:
    # CUDA runs asynchronously: wait for it so phase times are real.
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
