"""The loop: device-side tallies, training under a runtime, fit over epochs (best weights, divergence, compile)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from helpers import cpu_training, prepare_model, tiny_prepared, val_batches
from visiontune import engine
from visiontune.runtime import Runtime

CPU = Runtime(torch.device("cpu"), normalize=nn.Identity())


def test_tallies_average_over_images_not_batches():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([1.0, 0.0]))  # always predicts class 0
    batches = [(torch.zeros(3, 3), torch.tensor([0, 0, 1])), (torch.zeros(1, 3), torch.tensor([1]))]
    result = engine.evaluate(model, batches, nn.CrossEntropyLoss(), CPU)
    assert result.acc == pytest.approx(2 / 4)


@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_autocast_and_channels_last_train_on_cpu(channels_last):
    prepared = prepare_model("resnet", "scratch")
    model = prepared.module.to(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
    runtime = Runtime(torch.device("cpu"), nn.Identity(), torch.bfloat16, channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    before = model.fc.weight.clone()
    training = cpu_training(prepared, optimizer, runtime=runtime)
    result = engine.train_one_epoch(training, val_batches("resnet"))
    assert torch.isfinite(torch.tensor(result.loss)) and not torch.equal(before, model.fc.weight)
    assert model.fc.weight.dtype == torch.float32, "autocast keeps the weights in float32"


def test_fit_restores_the_best_epochs_weights_and_reports_each_epoch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    prepared = tiny_prepared(model)
    images = torch.randn(8, 3, 2, 2)
    loaders = {"train": [(images, torch.tensor([0, 1] * 4))], "val": [(images, torch.tensor([0, 1] * 4))]}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    reports, snapshots = [], {}

    def on_epoch(report, progress):
        reports.append(report)
        snapshots[report.epoch] = {k: v.clone() for k, v in model.state_dict().items()}

    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    training = cpu_training(prepared, optimizer, epochs=4, scheduler=scheduler)
    result = engine.fit(training, loaders, on_epoch=on_epoch)
    assert [r.epoch for r in reports] == [1, 2, 3, 4]
    assert [r.lrs["0"] for r in reports] == [0.5, 0.25, 0.125, 0.0625], "the lr each epoch trained with"
    assert result.val_curve == [r.val.acc for r in reports]
    assert result.best_acc == max(result.val_curve)
    assert result.best_epoch == result.val_curve.index(result.best_acc) + 1
    assert result.best_epoch < 4, "the case where restoring matters: training went on after the best epoch"
    for key, value in model.state_dict().items():
        assert torch.equal(value, snapshots[result.best_epoch][key])


def test_an_epoch_listener_returning_true_ends_fit_after_that_epoch():
    """How a search prunes a trial: fit stops where told, its result the epochs it trained."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    images = torch.randn(8, 3, 2, 2)
    loaders = {"train": [(images, torch.tensor([0, 1] * 4))], "val": [(images, torch.tensor([0, 1] * 4))]}
    training = cpu_training(tiny_prepared(model), torch.optim.SGD(model.parameters(), lr=0.1), epochs=5)
    result = engine.fit(training, loaders, on_epoch=lambda report, progress: report.epoch == 2)
    assert len(result.val_curve) == 2 and result.best_epoch <= 2


def test_a_nonfinite_training_loss_stops_fit_naming_epoch_and_batch():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    prepared = tiny_prepared(model)
    images, labels = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 0, 1])
    broken = torch.full_like(images, float("inf"))  # what an overflowing forward pass hands the loss
    loaders = {"train": [(images, labels), (broken, labels), (images, labels)], "val": [(images, labels)]}
    training = cpu_training(prepared, torch.optim.SGD(model.parameters(), lr=0.1), epochs=3)
    reports = []
    with pytest.raises(engine.NonFiniteLoss, match="in epoch 1, first at batch 2 of 3") as stopped:
        engine.fit(training, loaders, on_epoch=lambda report, progress: reports.append(report))
    assert "lower optimizer.lr (it is 0.1)" in str(stopped.value)
    assert reports == [], "no epoch with a non-finite loss is reported, let alone kept as best"


def test_compile_trains_the_models_own_weights_like_the_plain_loop():
    """compile=true: torch.compile'd training and validation update and score the same module,
    to float rounding."""
    images = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    loaders = {"train": [(images, torch.tensor([0, 1] * 4))], "val": [(images, torch.tensor([0, 1] * 4))]}
    results = []
    torch._dynamo.reset()
    for compile in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(48, 2))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        training = dataclasses.replace(
            cpu_training(tiny_prepared(model), optimizer, epochs=2), compile=compile
        )
        curve = engine.fit(training, loaders).val_curve
        results.append((curve, [p.detach().clone() for p in model.parameters()]))
    (curve, weights), (compiled_curve, compiled_weights) = results
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2, "training and validation compiled"
    assert compiled_curve == curve
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(weights, compiled_weights, strict=True))
