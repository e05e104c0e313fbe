"""distributed.py in one process, without torchrun: sync batch norm undone with its state, collectives
that leave values as they are. Two ranks under torchrun: tests/e2e/test_torchrun.py."""

from __future__ import annotations

import torch

from visiontune import distributed


def test_sync_batchnorm_goes_back_to_plain_batchnorm_with_the_same_state():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    model(torch.randn(2, 3, 8, 8))  # running statistics away from their start
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(model[1], torch.nn.SyncBatchNorm)
    distributed.plain_batchnorm(model)
    assert type(model[1]) is torch.nn.BatchNorm2d
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_without_torchrun_the_collectives_leave_values_as_they_are():
    assert distributed.Launch.from_env() is None
    assert distributed.sum_over_ranks([1.0, 2.0], torch.device("cpu")) == [1.0, 2.0]
    module = torch.nn.Linear(2, 2)
    assert distributed.data_parallel(module) is module
    assert distributed.broadcast("run") == "run"
