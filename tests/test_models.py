"""Head swaps, freezing, layer groups and weight loading for every architecture and mode, offline."""

from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from helpers import (
    ARCHS,
    MODES,
    SPECS,
    compose_cfg,
    cpu_training,
    input_size_for,
    offline_env,
    prepare_model,
)
from visiontune import VisiontuneError, config, engine, models

NUM_CLASSES = 3


def batch(model_name: str, n: int = 2):
    size = input_size_for(model_name)
    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, size, size, generator=generator), torch.tensor([0, 1] * (n // 2))


def head_param_names(model: nn.Module, heads) -> set[str]:
    return {f"{h}.{name}" for h in heads for name, _ in model.get_submodule(h).named_parameters()}


def file_weights(arch: str, path) -> models.Weights:
    return models.Weights(arch, str(path), kind="file")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model_name", ARCHS)
def test_output_shape_and_trainable_parameters(model_name, mode, standin_weights):
    prepared = prepare_model(model_name, mode, standin_weights, NUM_CLASSES)
    model = prepared.module
    images, _ = batch(model_name)
    model.eval()
    with torch.no_grad():
        assert model(images).shape == (2, NUM_CLASSES)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    if mode in ("feature_extract", "staged"):  # staged: its first epochs train the heads alone
        assert trainable == head_param_names(model, SPECS[model_name].heads)
    else:
        assert trainable == {name for name, _ in model.named_parameters()}


@pytest.mark.parametrize("model_name", ARCHS)
def test_feature_extract_step_leaves_backbone_bit_for_bit(model_name, standin_weights):
    prepared = prepare_model(model_name, "feature_extract", standin_weights, NUM_CLASSES)
    model = prepared.module
    before = {k: v.clone() for k, v in model.state_dict().items()}
    heads = head_param_names(model, SPECS[model_name].heads)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.1, momentum=0.9)
    engine.train_one_epoch(cpu_training(prepared, optimizer), [batch(model_name, 4)])
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "the heads must learn"
    assert changed <= heads, f"frozen tensors changed: {sorted(changed - heads)[:5]}"
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert len(prepared.frozen_norms) == len(norms), "every backbone BatchNorm is held in eval mode"


def test_tutorial_behaviour_lets_batchnorm_statistics_drift(standin_weights):
    prepared = prepare_model("resnet", "feature_extract", standin_weights, 2, "mode.freeze_norm_stats=false")
    model = prepared.module
    assert prepared.frozen_norms == () and not prepared.cache_backbone
    mean_before = model.bn1.running_mean.clone()
    prepared.train_mode()
    model(batch("resnet")[0])
    assert not torch.equal(mean_before, model.bn1.running_mean)
    assert all(not p.requires_grad for p in model.bn1.parameters())


@pytest.mark.parametrize("aux_loss_weight", [0.4, 0.0])
def test_inception_auxiliary_loss_trains_and_stays_out_of_evaluation(standin_weights, aux_loss_weight):
    prepared = prepare_model(
        "inception", "finetune", standin_weights, 2, f"model.aux_loss_weight={aux_loss_weight}"
    )
    model = prepared.module
    images, labels = batch("inception", 2)
    aux_fc = model.get_submodule("AuxLogits.fc")
    aux_before, main_before = aux_fc.weight.clone(), model.fc.weight.clone()
    optimizer = torch.optim.SGD([aux_fc.weight, model.fc.weight], lr=1.0)
    training = cpu_training(prepared, optimizer)
    engine.train_one_epoch(training, [(images, labels)])
    assert not torch.equal(main_before, model.fc.weight)
    # With weight 0 the auxiliary output is computed and ignored: its head gets no gradient.
    assert torch.equal(aux_before, aux_fc.weight) == (aux_loss_weight == 0)

    calls = []
    handle = model.AuxLogits.register_forward_hook(lambda *_: calls.append(1))
    result = engine.evaluate(model, [(images, labels)], nn.CrossEntropyLoss(), training.runtime)
    handle.remove()
    assert calls == [] and 0.0 <= result.acc <= 1.0


def test_resnet_feature_extract_trains_1026_parameters(standin_weights):
    prepared = prepare_model("resnet", "feature_extract", standin_weights, 2)
    assert prepared.parameter_counts()[0] == 512 * 2 + 2
    assert prepared.cache_backbone


def test_pretrained_weights_are_loaded_before_the_head_swap(standin_weights):
    path = standin_weights("resnet18")
    reference = torch.load(path, weights_only=True)
    model = models.build_model(SPECS["resnet"], 2, file_weights("resnet18", path))
    state = model.state_dict()
    assert torch.equal(state["conv1.weight"], reference["conv1.weight"])
    assert state["fc.weight"].shape == (2, 512)


def test_weights_api_reads_torch_home_cache(tmp_path, monkeypatch, standin_weights):
    """model.weights=DEFAULT goes through torchvision's weights API and its TORCH_HOME cache."""
    from torchvision.models import get_model_weights

    url = get_model_weights("squeezenet1_0").DEFAULT.url
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    cached = checkpoints / url.rsplit("/", 1)[1]
    cached.write_bytes(standin_weights("squeezenet1_0").read_bytes())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = models.resolve_weights("squeezenet1_0", "DEFAULT", tmp_path)
    assert weights.kind == "torchvision"
    model = models.build_model(SPECS["squeezenet"], 2, weights)
    reference = torch.load(cached, weights_only=True)
    assert torch.equal(model.features[0].weight, reference["features.0.weight"])


def test_weights_unavailable_offline_names_the_cache_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for var, value in offline_env({}).items():
        monkeypatch.setenv(var, value)
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(VisiontuneError) as err:
        models.build_model(SPECS["resnet"], 2, models.resolve_weights("resnet18", "DEFAULT", tmp_path))
    message = str(err.value)
    assert "resnet18" in message and str(tmp_path / "hub" / "checkpoints") in message
    assert "model.weights=PATH" in message and "mode=scratch" in message


def test_missing_weights_file(tmp_path):
    with pytest.raises(VisiontuneError, match="no such file"):
        models.build_model(SPECS["resnet"], 2, file_weights("resnet18", tmp_path / "nope.pth"))


def test_corrupt_weights_file(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(hashlib.sha256(b"x").digest() * 100)
    with pytest.raises(VisiontuneError, match="not a readable PyTorch state dict"):
        models.build_model(SPECS["resnet"], 2, file_weights("resnet18", bad))


def test_state_dict_of_another_architecture(standin_weights):
    with pytest.raises(VisiontuneError, match="another architecture"):
        models.build_model(SPECS["resnet"], 2, file_weights("resnet18", standin_weights("alexnet")))


@pytest.mark.parametrize("model_name", ARCHS)
def test_layer_groups_cover_every_parameter_once_from_input_to_head(model_name):
    prepared = prepare_model(model_name, "scratch")
    module, spec = prepared.module, SPECS[model_name]
    assert tuple(prepared.groups) == spec.group_names == ("early", "middle", "late", "head")
    grouped = [id(p) for params in prepared.groups.values() for p in params]
    assert sorted(grouped) == sorted(id(p) for p in module.parameters()), "each parameter exactly once"
    assert all(prepared.groups.values()), "no empty group"
    # Input to head: the groups' layers first run in group order in a forward pass.
    group_of = {id(p): name for name, params in prepared.groups.items() for p in params}
    order: list[str] = []

    def note(layer, *_):
        for p in layer.parameters(recurse=False):
            if not order or order[-1] != group_of[id(p)]:
                order.append(group_of[id(p)])

    hooks = [m.register_forward_hook(note) for m in module.modules()]
    module.eval()  # inception's auxiliary head, in `head` but fed from `middle`, stays out of the order
    size = input_size_for(model_name)
    with torch.no_grad():
        module(torch.rand(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    firsts = list(dict.fromkeys(order))
    assert firsts == list(spec.group_names), f"groups first run in the order {firsts}"


def test_a_layer_group_naming_a_missing_module_is_refused():
    from visiontune import VisiontuneError, models

    cfg = compose_cfg("model=resnet", "model.layer_groups.late=[layer4, layer5]")
    spec = config.model_spec(cfg.model)
    with pytest.raises(VisiontuneError, match="resnet18 has no module 'layer5'"):
        models.layer_groups(models.build_model(spec, 2, None), spec)
