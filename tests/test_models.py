"""Head swaps, freezing and weight loading for every architecture and mode, offline."""

from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from conftest import ARCHS, MODES, TEST_INPUT_SIZE, compose_cfg
from visiontune import VisiontuneError, engine, models

NUM_CLASSES = 3


def build(model_name: str, mode: str, weights_path) -> tuple[nn.Module, list, object]:
    cfg = compose_cfg(f"model={model_name}", f"mode={mode}")
    weights = str(weights_path(cfg.model.arch)) if cfg.mode.pretrained else None
    torch.manual_seed(0)
    model = models.build_model(
        cfg.model.arch,
        cfg.model.heads,
        NUM_CLASSES,
        weights,
        cfg.model.pretrained_kwargs,
        cfg.model.scratch_kwargs,
    )
    frozen = []
    if not cfg.mode.train_backbone:
        frozen = models.freeze_backbone(model, cfg.model.heads, cfg.mode.freeze_norm_stats)
    return model, frozen, cfg


def batch(model_name: str, n: int = 2):
    size = TEST_INPUT_SIZE.get(model_name, 64)
    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, size, size, generator=generator), torch.tensor([0, 1] * (n // 2))


def head_param_names(model: nn.Module, heads) -> set[str]:
    return {f"{h}.{name}" for h in heads for name, _ in model.get_submodule(h).named_parameters()}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model_name", ARCHS)
def test_output_shape_and_trainable_parameters(model_name, mode, standin_weights):
    model, _, cfg = build(model_name, mode, standin_weights)
    images, _ = batch(model_name)
    model.eval()
    with torch.no_grad():
        assert model(images).shape == (2, NUM_CLASSES)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    if mode == "feature_extract":
        assert trainable == head_param_names(model, cfg.model.heads)
    else:
        assert trainable == {name for name, _ in model.named_parameters()}


@pytest.mark.parametrize("model_name", ARCHS)
def test_feature_extract_step_leaves_backbone_bit_for_bit(model_name, standin_weights):
    model, frozen, cfg = build(model_name, "feature_extract", standin_weights)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    heads = head_param_names(model, cfg.model.heads)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.1, momentum=0.9)
    loader = [batch(model_name, 4)]
    runtime = engine.Runtime(torch.device("cpu"), normalize=torch.nn.Identity())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    engine.train_one_epoch(
        model, loader, nn.CrossEntropyLoss(), optimizer, runtime, scaler, cfg.model.aux_loss_weight, frozen
    )
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "the heads must learn"
    assert changed <= heads, f"frozen tensors changed: {sorted(changed - heads)[:5]}"
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert len(frozen) == len(norms), "every backbone BatchNorm is held in eval mode"


def test_tutorial_behaviour_lets_batchnorm_statistics_drift(standin_weights):
    cfg = compose_cfg("model=resnet", "mode=feature_extract", "mode.freeze_norm_stats=false")
    model = models.build_model(cfg.model.arch, cfg.model.heads, 2, str(standin_weights("resnet18")))
    frozen = models.freeze_backbone(model, cfg.model.heads, cfg.mode.freeze_norm_stats)
    assert frozen == []
    mean_before = model.bn1.running_mean.clone()
    models.set_train_mode(model, frozen)
    model(batch("resnet")[0])
    assert not torch.equal(mean_before, model.bn1.running_mean)
    assert all(not p.requires_grad for p in model.bn1.parameters())


def test_inception_auxiliary_loss_trains_and_stays_out_of_evaluation(standin_weights):
    model, frozen, cfg = build("inception", "finetune", standin_weights)
    images, labels = batch("inception", 2)
    runtime = engine.Runtime(torch.device("cpu"), normalize=torch.nn.Identity())
    aux_fc = model.get_submodule("AuxLogits.fc")
    aux_before = aux_fc.weight.clone()
    optimizer = torch.optim.SGD([aux_fc.weight], lr=1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    engine.train_one_epoch(
        model,
        [(images, labels)],
        nn.CrossEntropyLoss(),
        optimizer,
        runtime,
        scaler,
        cfg.model.aux_loss_weight,
    )
    assert not torch.equal(aux_before, aux_fc.weight), "the auxiliary head gets a gradient in training"

    calls = []
    handle = model.AuxLogits.register_forward_hook(lambda *_: calls.append(1))
    result = engine.evaluate(model, [(images, labels)], nn.CrossEntropyLoss(), runtime)
    handle.remove()
    assert calls == [] and 0.0 <= result.acc <= 1.0


def test_resnet_feature_extract_trains_1026_parameters(standin_weights):
    model, _, _ = build("resnet", "feature_extract", standin_weights)
    model = models.build_model("resnet18", ["fc"], 2, str(standin_weights("resnet18")))
    models.freeze_backbone(model, ["fc"], True)
    assert models.count_parameters(model)[0] == 512 * 2 + 2


def test_pretrained_weights_are_loaded_before_the_head_swap(standin_weights):
    path = standin_weights("resnet18")
    reference = torch.load(path, weights_only=True)
    model = models.build_model("resnet18", ["fc"], 2, str(path))
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
    model = models.build_model("squeezenet1_0", ["classifier.1"], 2, "DEFAULT")
    reference = torch.load(cached, weights_only=True)
    assert torch.equal(model.features[0].weight, reference["features.0.weight"])


def test_weights_unavailable_offline_names_the_cache_and_the_fix(tmp_path, monkeypatch):
    # A closed localhost port as proxy: the download fails at once and never leaves this machine.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with pytest.raises(VisiontuneError) as err:
        models.build_model("resnet18", ["fc"], 2, "DEFAULT")
    message = str(err.value)
    assert "resnet18" in message and str(tmp_path / "hub" / "checkpoints") in message
    assert "model.weights=PATH" in message and "mode=scratch" in message


def test_missing_weights_file(tmp_path):
    with pytest.raises(VisiontuneError, match="no such file"):
        models.build_model("resnet18", ["fc"], 2, str(tmp_path / "nope.pth"))


def test_corrupt_weights_file(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(hashlib.sha256(b"x").digest() * 100)
    with pytest.raises(VisiontuneError, match="not a readable PyTorch state dict"):
        models.build_model("resnet18", ["fc"], 2, str(bad))


def test_state_dict_of_another_architecture(standin_weights):
    with pytest.raises(VisiontuneError, match="another architecture"):
        models.build_model("resnet18", ["fc"], 2, str(standin_weights("alexnet")))
