"""An exponential moving average of a model's weights (ema.decay), updated after each optimiser step.

The average is a copy of the model (torch.optim.swa_utils.AveragedModel): parameters and float
buffers (batch-norm statistics) follow the model as `average += (1 - decay) * (model - average)`;
integer buffers (batch counts) are the model's own. Under torchrun every rank applies the same
step to the same weights, so the averaged parameters agree everywhere; the norm statistics,
which each rank gathers from its own images, are averaged over the ranks after each epoch, as
the model's are.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from visiontune import distributed


def _lerp(decay: float):
    """AveragedModel's multi_avg_fn: the exponential average for floats, a copy for counters."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], _) -> None:
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1 - decay)
        else:  # num_batches_tracked: an average of counts means nothing
            torch._foreach_copy_(averaged, current)

    return update


class WeightAverage:
    """The moving average of `module`'s weights, on its device, starting from its weights now."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.averaged = AveragedModel(module, multi_avg_fn=_lerp(decay), use_buffers=True)
        self.averaged.requires_grad_(False)  # only ever written under no_grad
        # Counted as the first average: the next update moves it by 1 - decay, not onto the model.
        self.averaged.update_parameters(module)

    @property
    def module(self) -> nn.Module:
        """The averaged model, with the model's own structure and state_dict keys."""
        return self.averaged.module

    def update(self, module: nn.Module) -> None:
        """One step of the average towards `module` (the plain model, never its DDP wrapper)."""
        self.averaged.update_parameters(module)

    def end_epoch(self, module: nn.Module) -> None:
        """Under torchrun: the averaged norm statistics made the same on every rank, for the norms
        that trained (as `module`'s are, by distributed.average_norm_statistics)."""
        if distributed.world_size() == 1:
            return
        for mine, theirs in zip(self.module.modules(), module.modules(), strict=True):
            mine.training = theirs.training
        distributed.average_norm_statistics(self.module)
        self.module.eval()

    def state_dict(self) -> dict:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.averaged.load_state_dict(state)
