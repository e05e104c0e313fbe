"""Every model x mode x optimizer x scheduler composes into typed values the code can use."""

import re

import pytest
import torch

from helpers import ARCHS, MODES, compose_cfg, tiny_prepared
from visiontune import VisiontuneError, config


def test_the_six_tutorial_architectures_ship():
    assert set(ARCHS) == {"resnet", "alexnet", "vgg", "squeezenet", "densenet", "inception"}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model", ARCHS)
def test_every_model_and_mode_composes_into_a_spec(model, mode):
    cfg = compose_cfg(f"model={model}", f"mode={mode}")
    spec = config.model_spec(cfg.model)
    assert spec.name == model
    assert spec.input_size == (299 if model == "inception" else 224)
    assert (spec.aux_head is not None) == (model == "inception")
    assert spec.aux_loss_weight == (0.4 if model == "inception" else 0.0)  # the tutorial's weight
    parsed = config.mode_of(cfg.mode)
    assert parsed.pretrained == (mode != "scratch")
    assert parsed.train_backbone == (mode != "feature_extract")
    config.read(cfg)


def test_an_aux_loss_weight_needs_an_aux_head():
    with pytest.raises(VisiontuneError, match="resnet has no auxiliary head"):
        config.model_spec(compose_cfg("model=resnet", "+model.aux_loss_weight=0.3").model)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("epochs=0", "epochs=0 must be a positive whole number"),
        ("optimizer.lr=-1", "optimizer.lr=-1 must be a positive number"),
        ("precision=fp8", "precision=fp8 must be one of auto, off, bf16, fp16"),
        ("channels_last=maybe", "channels_last=maybe must be auto, true or false"),
        ("compile=yes", "compile=yes must be true or false"),
        ("backbone_batch_size=0", "backbone_batch_size=0 must be auto or a whole number of images"),
        ("backbone_batch_size=lots", "backbone_batch_size=lots must be auto or a whole number of images"),
        ("model.input_size=64", "model.input_size=64 is too small for inception"),
        ("model.weights=null", "model.weights is null"),
        ("batch_size=1", "batch_size=1 is too small for inception"),
    ],
)
def test_values_no_training_can_use_are_refused(override, message):
    cfg = compose_cfg("model=inception", "mode=finetune", override)
    with pytest.raises(VisiontuneError, match=message):
        config.read(cfg)


def test_default_is_the_tutorials_experiment():
    cfg = compose_cfg()
    assert (cfg.model.name, cfg.mode.name, cfg.data.name) == ("squeezenet", "feature_extract", "hymenoptera")
    assert (cfg.epochs, cfg.batch_size) == (15, 8)
    assert cfg.optimizer._target_ == "torch.optim.SGD"
    assert (cfg.optimizer.lr, cfg.optimizer.momentum) == (0.001, 0.9)
    assert cfg.mode.freeze_norm_stats is True


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_optimizers_instantiate_with_overrides(name):
    from visiontune import optim

    cfg = compose_cfg(f"optimizer={name}", "optimizer.lr=0.0003")
    optimizer = optim.build_optimizer(
        config.read(cfg).optim, tiny_prepared(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2, 2)))
    )
    assert type(optimizer).__name__.lower() == name
    assert optimizer.param_groups[0]["lr"] == pytest.approx(3e-4)


@pytest.mark.parametrize("name", ["none", "step", "cosine", "onecycle"])
def test_schedulers_instantiate(name):
    from visiontune import optim

    cfg = compose_cfg(f"scheduler={name}", "epochs=4")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    settings = config.read(cfg).optim
    scheduler, per_batch = optim.build_scheduler(settings, optimizer, 4, 3), settings.per_batch
    if name == "none":
        assert scheduler is None and not per_batch
        return
    assert per_batch == (name == "onecycle")
    for _ in range(12 if per_batch else 4):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] < 1.0 or name == "step"
    if name == "cosine":
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # ends at final_factor 0


def test_trainable_from_must_name_a_group():
    from visiontune import VisiontuneError

    cfg = compose_cfg("model=resnet", "mode=finetune", "mode.trainable_from=layer3")
    with pytest.raises(VisiontuneError, match="use one of early, middle, late, head"):
        config.read(cfg)


def test_an_imagefolder_without_root_says_how_to_give_one():
    with pytest.raises(VisiontuneError) as raised:
        config.read(compose_cfg("data=imagefolder"))
    assert str(raised.value) == (
        "data.root is required for data=imagefolder: data.root=/path/to/folder "
        "(with train/ and val/ inside, or one folder per class)"
    )


@pytest.mark.parametrize(
    ("value", "is_file"),
    [
        ("DEFAULT", False),
        ("IMAGENET1K_V1", False),
        ("runs:/0123abcd/model", False),
        ("models:/ants@champion", False),
        ("/no/such.pth", True),
        ("weights/resnet.pth", True),
        ("ResNet18_Weights.IMAGENET1K_V1", True),  # not a name resolve_weights takes: a file
    ],
)
def test_weights_files_are_told_from_names_and_uris(tmp_path, value, is_file):
    mode = config.mode_of(compose_cfg("mode=finetune").mode)
    found = config.weights_file(value, mode, tmp_path)
    assert found == ((tmp_path / value).resolve() if is_file else None)


def test_a_mode_without_pretrained_weights_names_no_weights_file(tmp_path):
    scratch = config.mode_of(compose_cfg("mode=scratch").mode)
    assert config.weights_file("/no/such.pth", scratch, tmp_path) is None


@pytest.mark.parametrize("typed", ["2024", "nan", "true"])
def test_an_experiment_name_yaml_reads_as_a_number_or_flag_is_the_text_typed(typed):
    from omegaconf import open_dict

    cfg = compose_cfg(f"mlflow.experiment_name={typed}")
    assert not isinstance(cfg.mlflow.experiment_name, str), "YAML reads it as a number or a flag"
    with open_dict(cfg):  # the config a sweep callback gets holds the overrides as typed
        cfg.hydra = {"overrides": {"task": [f"mlflow.experiment_name={typed}"]}}
    assert config.read_mlflow(cfg).experiment_name == typed


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("ema.decay=1", "ema.decay=1 must be null"),
        ("ema.decay=true", "ema.decay=True must be null"),
        ("early_stopping.patience=-1", "early_stopping.patience=-1 must be 0 or a positive whole number"),
        ("early_stopping.min_delta=-0.1", "early_stopping.min_delta=-0.1 must be 0 or a positive number"),
        ("accumulate_batches=0", "accumulate_batches=0 must be a positive whole number"),
        ("clip_grad_norm=0", "clip_grad_norm=0 must be a positive number"),
    ],
)
def test_loop_options_no_training_can_use_are_one_line(override, message):
    with pytest.raises(VisiontuneError, match=re.escape(message)):
        config.read(compose_cfg(override))


def test_loop_options_are_read_with_ema_zero_meaning_off():
    loop = config.read(compose_cfg("ema.decay=0", "early_stopping.patience=3", "accumulate_batches=4")).loop
    assert (loop.ema.on, loop.early_stopping.patience, loop.accumulate_batches) == (False, 3, 4)
    assert config.read(compose_cfg("ema.decay=0.999")).loop.ema.decay == 0.999
