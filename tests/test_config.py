"""Every model x mode x optimizer x scheduler composes into a config the code can use."""

import pytest
from hydra.utils import instantiate

from conftest import ARCHS, MODES, compose_cfg


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model", ARCHS)
def test_every_model_and_mode_composes(model, mode):
    cfg = compose_cfg(f"model={model}", f"mode={mode}")
    assert cfg.model.name == model
    assert cfg.model.arch == ARCHS[model]
    assert cfg.model.input_size == (299 if model == "inception" else 224)
    assert cfg.model.heads, "every model names at least one head"
    assert cfg.mode.name == mode
    assert cfg.mode.pretrained == (mode != "scratch")
    assert cfg.mode.train_backbone == (mode != "feature_extract")


def test_default_is_the_tutorials_experiment():
    cfg = compose_cfg()
    assert (cfg.model.name, cfg.mode.name, cfg.data.name) == ("squeezenet", "feature_extract", "hymenoptera")
    assert (cfg.epochs, cfg.batch_size) == (15, 8)
    assert cfg.optimizer._target_ == "torch.optim.SGD"
    assert (cfg.optimizer.lr, cfg.optimizer.momentum) == (0.001, 0.9)
    assert cfg.mode.freeze_norm_stats is True


def test_only_inception_has_an_auxiliary_loss():
    weights = {m: compose_cfg(f"model={m}").model.aux_loss_weight for m in ARCHS}
    assert weights == {m: (0.4 if m == "inception" else 0.0) for m in ARCHS}


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_optimizers_instantiate_with_overrides(name):
    import torch

    cfg = compose_cfg(f"optimizer={name}", "optimizer.lr=0.0003")
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = instantiate(cfg.optimizer)(params=[param])
    assert type(optimizer).__name__.lower() == name
    assert optimizer.param_groups[0]["lr"] == pytest.approx(3e-4)


@pytest.mark.parametrize("name", ["none", "step", "cosine"])
def test_schedulers_instantiate(name):
    import torch

    cfg = compose_cfg(f"scheduler={name}", "epochs=4")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    if name == "none":
        assert not cfg.scheduler
        return
    scheduler = instantiate(cfg.scheduler)(optimizer=optimizer)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] < 1.0 or name == "step"
    if name == "cosine":
        assert scheduler.T_max == 4  # follows epochs
