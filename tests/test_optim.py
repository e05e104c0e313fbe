"""optim.py: staged unfreezing with layer-wise rates (also after a resume), no decay on norms and
biases, one-cycle stepped every batch."""

import pytest
import torch
from torch import nn

from helpers import compose_cfg, cpu_training, prepare_model
from visiontune import checkpoint, config, engine, optim


def test_staged_mode_unfreezes_group_by_group_and_keeps_its_rates(standin_weights):
    overrides = ("mode.freeze_epochs=1", "mode.unfreeze_every=1", "mode.trainable_from=middle")
    prepared = prepare_model("squeezenet", "staged", standin_weights, 2, *overrides)
    cfg = compose_cfg("optimizer=sgd", "optimizer.lr=0.01", "optimizer.lr_decay=0.5")
    optimizer = optim.build_optimizer(config.read(cfg).optim, prepared)
    rates = {group["name"]: group["lr"] for group in optimizer.param_groups}
    assert rates == {"middle": 0.0025, "late": 0.005, "head": 0.01}, "early never trains: not in it"
    images = torch.rand(4, 3, 64, 64)
    loaders = {"train": [(images, torch.tensor([0, 1, 0, 1]))], "val": [(images, torch.tensor([0, 1, 0, 1]))]}
    snapshots, reports = [], []

    def on_epoch(report, progress):
        reports.append(report)
        snapshots.append({k: v.clone() for k, v in prepared.module.named_parameters()})

    before = {k: v.clone() for k, v in prepared.module.named_parameters()}
    engine.fit(cpu_training(prepared, optimizer, epochs=4), loaders, on_epoch=on_epoch)
    expected = [("head",), ("late", "head"), ("middle", "late", "head"), ("middle", "late", "head")]
    assert [r.trainable for r in reports] == expected
    assert [r.lrs for r in reports] == [rates] * 4, "one optimiser, its rates unchanged without a schedule"
    group_of = {
        name: group
        for group, params in prepared.groups.items()
        for name, p in prepared.module.named_parameters()
        if any(p is q for q in params)
    }
    for epoch, (previous, now) in enumerate(zip([before, *snapshots], snapshots, strict=False), start=1):
        changed = {group_of[k] for k in now if not torch.equal(previous[k], now[k])}
        assert changed == set(expected[epoch - 1]), f"epoch {epoch}: {changed} changed"


def test_a_resumed_staged_run_trains_the_unfrozen_groups(standin_weights, tmp_path):
    def training_for_run(epochs: int):
        prepared = prepare_model("squeezenet", "staged", standin_weights, 2, "mode.freeze_epochs=1")
        optimizer = optim.build_optimizer(config.read(compose_cfg("optimizer=adam")).optim, prepared)
        return cpu_training(prepared, optimizer, epochs=epochs)

    images, labels = torch.rand(4, 3, 64, 64), torch.tensor([0, 1, 0, 1])
    loaders = {"train": [(images, labels)], "val": [(images, labels)]}
    first = training_for_run(epochs=2)  # as if stopped after epoch 2, in stage two
    engine.fit(
        first,
        loaders,
        on_epoch=lambda r, p: checkpoint.save(
            tmp_path, first, p, {"run_id": "x", "config": {}, "metrics": []}
        ),
    )
    again = training_for_run(epochs=3)
    assert again.model.trainable == ("head",), "a new process starts in stage one"
    progress = checkpoint.restore(checkpoint.read(tmp_path), again)
    reports = []
    engine.fit(again, loaders, on_epoch=lambda r, p: reports.append(r), progress=progress)
    assert [r.epoch for r in reports] == [3]
    assert reports[0].trainable == ("early", "middle", "late", "head")
    assert all(p.requires_grad for p in again.model.module.parameters())


def test_adamw_leaves_norm_weights_and_biases_undecayed(standin_weights):
    prepared = prepare_model("resnet", "finetune", standin_weights, 2)
    cfg = compose_cfg("optimizer=adamw", "optimizer.weight_decay=0.5", "optimizer.lr=0.1")
    optimizer = optim.build_optimizer(config.read(cfg).optim, prepared)
    spared = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    module = prepared.module
    one_d = {id(p) for p in module.parameters() if p.ndim == 1}
    assert spared == one_d and {id(module.bn1.weight), id(module.fc.bias)} <= spared
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    for p in module.parameters():
        p.grad = torch.zeros_like(p)  # only the decay moves a weight
    optimizer.step()
    moved = {name for name, p in module.named_parameters() if not torch.equal(before[name], p)}
    assert moved == {name for name, p in module.named_parameters() if p.ndim > 1}

    kept = optim.build_optimizer(
        config.read(compose_cfg("optimizer=adamw", "optimizer.decay_norm_and_bias=true")).optim, prepared
    )
    assert all(g["weight_decay"] == 0.01 for g in kept.param_groups)


def test_one_cycle_steps_every_batch_and_peaks_at_each_groups_rate():
    layers = nn.Sequential(nn.Flatten(), nn.Linear(2, 2))
    optimizer = torch.optim.SGD(
        [{"params": [layers[1].weight], "lr": 0.1}, {"params": [layers[1].bias], "lr": 0.01}]
    )
    settings = config.read(compose_cfg("scheduler=onecycle")).optim
    scheduler = optim.build_scheduler(settings, optimizer, epochs=4, steps_per_epoch=5)
    assert settings.per_batch
    seen = []
    for _ in range(20):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert seen[0] == pytest.approx([0.1 / 25, 0.01 / 25]), "starts at max / div_factor"
    peak = max(range(20), key=lambda step: seen[step][0])
    assert peak == 4 and seen[peak] == pytest.approx([0.1, 0.01]), "peaks at pct_start (0.25) of 20 steps"
    assert seen[-1][0] < 0.1 / 25 / 100, "anneals far below the start"


def test_one_cycle_on_a_short_run_warms_up_over_two_steps_or_says_it_is_too_short():
    from visiontune import VisiontuneError

    settings = config.read(compose_cfg("scheduler=onecycle")).optim
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = optim.build_scheduler(settings, optimizer, epochs=2, steps_per_epoch=2)  # torch: ÷0
    seen = []
    for _ in range(4):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[1] == pytest.approx(0.1) and seen[0] < seen[1] and seen[3] < seen[1]
    with pytest.raises(VisiontuneError, match="needs at least 4 training steps, this run has 3"):
        optim.build_scheduler(settings, optimizer, epochs=1, steps_per_epoch=3)
