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


# --- the moving average of the weights (ema.decay) -------------------------------------------------


def test_the_moving_average_follows_each_step_by_one_minus_decay_and_copies_counters():
    from visiontune.ema import WeightAverage

    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    average = WeightAverage(model, decay=0.9)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()(torch.randn(8, 3))  # the norm's statistics and batch count move
    with torch.no_grad():
        model[0].weight.add_(1.0)
    average.update(model)
    now, averaged = model.state_dict(), average.module.state_dict()
    for key in ("0.weight", "0.bias", "1.running_mean", "1.running_var"):
        assert torch.allclose(averaged[key], 0.9 * start[key] + 0.1 * now[key]), key
    assert averaged["1.num_batches_tracked"] == now["1.num_batches_tracked"] == 1, "a counter is copied"
    assert not any(p.requires_grad for p in average.module.parameters())


def separable(n: int = 16, flip: bool = False):
    """Images of 12 numbers whose class is whether the first is positive (the other way round with flip)."""
    images = torch.randn(n, 3, 2, 2, generator=torch.Generator().manual_seed(3))
    labels = (images.flatten(1)[:, 0] > 0).long()
    return images, 1 - labels if flip else labels


def test_the_average_is_validated_each_epoch_and_becomes_the_model_where_it_scores_higher():
    """Training on flipped labels drives the weights wrong fast; the slow average stays near the
    right start: it is the best epoch's model, and fit ends holding its weights."""
    from visiontune.ema import WeightAverage

    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].weight[1, 0] = 1.0  # logit of class 1 = first number: every val image right
        model[1].bias.zero_()
    loaders = {"train": [separable(flip=True)] * 4, "val": [separable()]}
    average = WeightAverage(model, decay=0.99)
    training = dataclasses.replace(
        cpu_training(tiny_prepared(model), torch.optim.SGD(model.parameters(), lr=5.0), epochs=2), ema=average
    )
    reports = []
    result = engine.fit(training, loaders, on_epoch=lambda r, p: reports.append(r))
    assert [r.val.acc for r in reports] == [0.0, 0.0], "the weights learnt the flipped labels"
    ema_curve = [r.val_ema.acc for r in reports]
    assert min(ema_curve) > 0.5
    assert (result.best_acc, result.best_from) == (max(ema_curve), engine.EMA)
    assert result.best_epoch == ema_curve.index(max(ema_curve)) + 1
    assert result.val_curve == [0.0, 0.0], "val_acc stays the raw weights' curve"
    assert engine.evaluate(model, loaders["val"], nn.CrossEntropyLoss(), CPU).acc == result.best_acc


# --- early stopping ---------------------------------------------------------------------------------


def test_early_stopping_ends_fit_after_patience_epochs_without_improvement():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    loaders = {"train": [separable()], "val": [separable()]}
    training = dataclasses.replace(
        cpu_training(tiny_prepared(model), torch.optim.SGD(model.parameters(), lr=0.0), epochs=10),
        patience=2,
    )
    reports = []
    result = engine.fit(training, loaders, on_epoch=lambda r, p: reports.append(r))
    assert [r.epoch for r in reports] == [1, 2, 3], "epoch 1 sets the mark; 2 and 3 do not beat it"
    assert result.stopped_early.startswith("early stopping after epoch 3 of 10")
    assert "did not improve by more than 0 in 2 epochs" in result.stopped_early


def test_an_improvement_within_min_delta_does_not_reset_the_patience():
    progress = engine.Progress()
    for epoch, acc in enumerate([0.50, 0.505, 0.509, 0.52], start=1):
        result = engine.PhaseResult(loss=1.0, acc=acc, seconds=0.0)
        engine._advance(progress, epoch, (result, nn.Linear(1, 1)), (None, None), min_delta=0.01)
        if epoch == 3:
            assert progress.waited == 2 and progress.best_epoch == 3, "best moves on, the count does not"
    assert (progress.waited, progress.watched) == (0, 0.52)


def test_without_patience_fit_runs_every_epoch():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    loaders = {"train": [separable()], "val": [separable()]}
    training = cpu_training(tiny_prepared(model), torch.optim.SGD(model.parameters(), lr=0.0), epochs=4)
    assert engine.fit(training, loaders).stopped_early is None


# --- accumulation and clipping ---------------------------------------------------------------------


def counted_steps(optimizer) -> list:
    """A list that grows by one at each step of `optimizer`."""
    steps = []
    optimizer.register_step_post_hook(lambda *args: steps.append(1))
    return steps


def test_accumulating_k_batches_steps_as_one_batch_k_times_larger():
    images, labels = separable(16)
    weights = []
    for accumulate, batches in ((4, 4), (1, 1)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
        training = dataclasses.replace(
            cpu_training(tiny_prepared(model), torch.optim.SGD(model.parameters(), lr=0.5)),
            accumulate_batches=accumulate,
        )
        steps = counted_steps(training.optimizer)
        engine.train_one_epoch(training, list(zip(images.chunk(batches), labels.chunk(batches), strict=True)))
        assert len(steps) == 1, "one optimiser step for the epoch"
        weights.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*weights, strict=True))


def test_a_last_short_group_of_batches_still_steps():
    images, labels = separable(12)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    training = dataclasses.replace(
        cpu_training(tiny_prepared(model), torch.optim.SGD(model.parameters(), lr=0.5)), accumulate_batches=2
    )
    steps = counted_steps(training.optimizer)
    engine.train_one_epoch(training, list(zip(images.chunk(3), labels.chunk(3), strict=True)))
    assert len(steps) == 2 and all(p.grad is None for p in model.parameters())


def test_clipping_caps_the_unscaled_gradient_norm_under_a_gradient_scaler():
    """fp16's scaler multiplies the loss by 2**10: clipping must see the true gradients."""
    images, labels = separable(8)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    before = [p.detach().clone() for p in model.parameters()]
    training = dataclasses.replace(
        cpu_training(tiny_prepared(model), torch.optim.SGD(model.parameters(), lr=1.0)),
        scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10),
        clip_grad_norm=1e-3,
    )
    engine.train_one_epoch(training, [(images * 100, labels)])
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before, strict=True)])
    assert moved.norm().item() == pytest.approx(1e-3, rel=1e-3), "lr 1 x the clipped norm"


# --- top-5 accuracy ---------------------------------------------------------------------------------


def test_top5_accuracy_is_counted_over_more_than_five_classes_only():
    logits = torch.arange(7.0).repeat(4, 1)  # ranks classes 6, 5, 4, 3, 2 first
    model = nn.Sequential(nn.Flatten(), nn.Linear(1, 7))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(logits[0])
    batches = [(torch.zeros(4, 1), torch.tensor([6, 2, 1, 0]))]
    result = engine.evaluate(model, batches, nn.CrossEntropyLoss(), CPU)
    assert (result.acc, result.top5) == (0.25, 0.5)
    two = engine.evaluate(
        nn.Sequential(nn.Flatten(), nn.Linear(1, 2)),
        batches[:0] or [(torch.zeros(2, 1), torch.tensor([0, 1]))],
        nn.CrossEntropyLoss(),
        CPU,
    )
    assert two.top5 is None


# --- mixup / cutmix through the soft-target seam ------------------------------------------------------


class ReverseMix:
    """A mixer written for the test: each image blended with the batch reversed, by a drawn weight."""

    def __init__(self, num_classes: int, one_hot: bool = False):
        self.num_classes, self.one_hot, self.draws = num_classes, one_hot, []

    def __call__(self, images, labels, generator):
        lam = 1.0 if self.one_hot else torch.rand((), generator=generator).item()
        self.draws.append(lam)
        targets = nn.functional.one_hot(labels, self.num_classes).float()
        return lam * images + (1 - lam) * images.flip(0), lam * targets + (1 - lam) * targets.flip(0)


def mixed_training(mix, smoothing: float = 0.0, epochs: int = 1):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    training = cpu_training(tiny_prepared(model), torch.optim.SGD(model.parameters(), lr=0.5), epochs=epochs)
    return dataclasses.replace(
        training, mix=mix, criterion=nn.CrossEntropyLoss(label_smoothing=smoothing), seed=5
    )


def test_one_hot_soft_targets_train_exactly_as_labels_with_label_smoothing():
    batches = [separable(8)] * 3
    plain, mixed = mixed_training(None, smoothing=0.1), mixed_training(ReverseMix(2, one_hot=True), 0.1)
    first, second = engine.train_one_epoch(plain, batches), engine.train_one_epoch(mixed, batches)
    assert first.loss == pytest.approx(second.loss, abs=1e-6)
    for a, b in zip(plain.model.module.parameters(), mixed.model.module.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert first.acc is not None and second.acc is None, "a mixed batch's accuracy is left out"


def test_each_batch_mixes_with_draws_of_its_own_epoch_and_index():
    """A resumed run's epoch 2 draws what the uninterrupted run's epoch 2 drew."""
    batches = [separable(8)] * 3
    whole = ReverseMix(2)
    engine.train_one_epoch(mixed_training(whole), batches, epoch=1)
    engine.train_one_epoch(mixed_training(whole), batches, epoch=2)
    resumed = ReverseMix(2)
    engine.train_one_epoch(mixed_training(resumed), batches, epoch=2)
    assert resumed.draws == whole.draws[3:] and whole.draws[:3] != whole.draws[3:]
    assert len(set(whole.draws)) == 6
