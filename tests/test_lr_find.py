"""lr_find.py and visiontune-lr-find: the exponential range test, its suggestion, and nothing kept of it."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from helpers import compose_cfg, cpu_training, tiny_prepared
from visiontune import VisiontuneError, config, lr_find

SETTINGS = config.RangeTestSettings(start_lr=1e-7, end_lr=10.0, steps=100, smoothing=0.98, diverge=4.0)


def batches(n: int = 4):
    generator = torch.Generator().manual_seed(0)
    images = 10 * torch.randn(n * 8, 3, 2, 2, generator=generator)
    labels = torch.randint(0, 2, (n * 8,), generator=generator)  # no rate fits them: large ones blow up
    return list(zip(images.chunk(n), labels.chunk(n), strict=True))


def test_the_rates_rise_exponentially_from_start_to_end():
    rates = lr_find.rates(SETTINGS)
    assert len(rates) == 100 and rates[0] == 1e-7 and rates[-1] == pytest.approx(10.0)
    ratios = [b / a for a, b in zip(rates, rates[1:], strict=False)]
    assert max(ratios) == pytest.approx(min(ratios)), "one constant factor from rate to rate"


def test_the_range_test_restores_model_and_optimiser_and_suggests_below_the_blow_up():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    training = cpu_training(tiny_prepared(model), optimizer)
    # A step taken before: the optimiser holds momentum that the test must give back untouched.
    model(torch.randn(2, 3, 2, 2)).sum().backward()
    optimizer.step()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = {k: v["momentum_buffer"].clone() for k, v in optimizer.state_dict()["state"].items()}

    test = lr_find.run(training, batches(), SETTINGS)

    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items()), "no trained weights kept"
    state = optimizer.state_dict()
    assert all(torch.equal(v, state["state"][k]["momentum_buffer"]) for k, v in momentum.items())
    assert state["param_groups"][0]["lr"] == 0.01, "the configured rate is back"
    assert all(p.grad is None for p in model.parameters())
    assert test.diverged and len(test.lrs) < 100, "a linear model blows up well before lr 10"
    assert test.lrs == lr_find.rates(SETTINGS)[: len(test.lrs)]
    assert (test.suggested, test.steepest) == lr_find.suggestions(test.lrs, test.losses)
    assert 1e-7 < test.suggested < test.lrs[-1]


def test_every_layer_group_keeps_its_ratio_to_the_heads_rate():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    optimizer = torch.optim.SGD(
        [{"params": [model[1].weight], "lr": 0.1}, {"params": [model[1].bias], "lr": 0.01}]
    )
    seen = []
    optimizer.register_step_pre_hook(lambda opt, *args: seen.append([g["lr"] for g in opt.param_groups]))
    lr_find.run(cpu_training(tiny_prepared(model), optimizer), batches(), SETTINGS)
    assert all(math.isclose(low, high / 10) for high, low in seen)
    assert seen[0][0] == 1e-7


def test_the_suggestions_are_fastais_minimum_over_ten_and_steepest_descent():
    lrs = [10 ** (-7 + i * 0.1) for i in range(40)]
    losses = [2.0 - 0.05 * i if i < 30 else 0.5 + 0.3 * (i - 30) for i in range(40)]  # lowest at i = 30
    losses[20] -= 0.2  # the steepest single drop on the way down: from 19 to 20
    losses[33] -= 0.6  # a steeper dip in the blow-up, past the minimum: not a rate to suggest
    minimum, steepest = lr_find.suggestions(lrs, losses)
    assert minimum == pytest.approx(lrs[30] / 10)
    assert steepest == pytest.approx(lrs[20])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lr_find.end_lr=1e-8", "needs end_lr > start_lr"),
        ("lr_find.steps=5", "10 steps or more"),
        ("lr_find.smoothing=1", "lr_find.smoothing=1 must be from 0"),
    ],
)
def test_range_settings_that_make_no_curve_are_refused(override, message):
    with pytest.raises(VisiontuneError, match=message):
        config.range_test_settings(compose_cfg_lr_find(override))


def compose_cfg_lr_find(*overrides):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="visiontune.conf", version_base="1.3"):
        return compose(config_name="lr_find", overrides=list(overrides))


def test_lr_find_composes_every_training_group_and_key():
    cfg = compose_cfg_lr_find("model=resnet", "optimizer=adamw", "lr_find.steps=20")
    assert config.range_test_settings(cfg).steps == 20
    trained = compose_cfg("model=resnet", "optimizer=adamw")
    assert config.read(cfg) == config.read(trained), "the same Settings as visiontune-train's"
