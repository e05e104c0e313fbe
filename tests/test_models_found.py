"""model=torchvision and model=timm: heads, layer groups and preprocessing found, weights loaded
offline, every mode applied; random weights and small inputs throughout."""

from __future__ import annotations

import functools
import logging
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from helpers import compose_cfg, offline_env
from visiontune import VisiontuneError, config, found, models
from visiontune.config import HEAD_GROUP

NUM_CLASSES = 3
# A representative handful by default (a CNN with a conv stem, a 1x1-conv head, an aux-headed net,
# a transformer); -m slow checks every torchvision classifier.
TORCHVISION = ["mobilenet_v3_small", "squeezenet1_1", "googlenet", "vit_b_16"]
TIMM = ["resnet10t", "convnext_atto", "vit_tiny_patch16_224", "efficientnet_b0"]


def found_spec(source: str, arch: str, *overrides: str) -> config.ModelSpec:
    return config.model_spec(compose_cfg(f"model={source}", f"model.arch={arch}", *overrides).model)


@functools.cache  # tests read these models; none trains them
def built(source: str, arch: str, weights=None) -> tuple[nn.Module, config.ModelSpec]:
    torch.manual_seed(0)
    return models.build(found_spec(source, arch), NUM_CLASSES, weights)


def all_torchvision() -> list:
    from torchvision import models as tv

    names = tv.list_models(module=tv)
    return [n if n in TORCHVISION else pytest.param(n, marks=pytest.mark.slow) for n in names]


def first_calls(model: nn.Module, size: int) -> dict[str, int]:
    """Module path -> the order of its first call in one forward pass."""
    order: dict[str, int] = {}

    def note(path: str):
        def hook(_module, _inputs) -> None:
            order.setdefault(path, len(order))

        return hook

    hooks = [m.register_forward_pre_hook(note(path)) for path, m in model.named_modules()]
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    return order


def assert_structure(model: nn.Module, spec: config.ModelSpec) -> None:
    """Heads of NUM_CLASSES outputs; every parameter in one group; groups run input to output."""
    assert model(torch.randn(1, 3, spec.input_size, spec.input_size)).shape == (1, NUM_CLASSES)
    groups = models.layer_groups(model, spec)
    grouped = [id(p) for params in groups.values() for p in params]
    assert len(grouped) == len(set(grouped)) == len(list(model.parameters()))
    assert all(groups[name] for name in spec.group_names), {n: len(p) for n, p in groups.items()}
    order = first_calls(model, spec.input_size)
    params = dict(model.named_parameters())
    starts = []
    for name in spec.group_names:
        paths = spec.layer_groups.get(name, spec.heads)
        owners = [p.rpartition(".")[0] if p in params else p for p in paths]  # a parameter: its module
        called = [order[m] for m in owners if m and m in order]
        if called:  # a group of bare parameters only (a class token) has no call of its own
            starts.append(min(called))
    assert starts == sorted(starts), (
        f"groups out of order: {dict(zip(spec.group_names, starts, strict=False))}"
    )


@pytest.mark.parametrize("arch", all_torchvision())
def test_every_torchvision_classifier_gets_a_head_and_ordered_groups(arch):
    model, spec = built("torchvision", arch)
    model.eval()
    with torch.no_grad():
        assert_structure(model, spec)


@pytest.mark.parametrize("arch", TIMM)
def test_timm_models_get_their_head_and_group_matcher_groups(arch):
    model, spec = built("timm", arch)
    assert spec.head == next(p for p, m in model.named_modules() if m is model.get_classifier())
    model.eval()
    with torch.no_grad():
        assert_structure(model, spec)


def test_aux_heads_are_found_and_dropped_and_the_rebuilt_model_matches():
    from visiontune import portable

    model, spec = built("torchvision", "googlenet")
    assert spec.heads == ("fc",) and model.aux1 is None and model.aux2 is None
    build = getattr(model, portable.BUILD_ATTRIBUTE)
    assert build["builder_kwargs"]["aux_logits"] is False
    model.train()
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, NUM_CLASSES)  # logits alone in training too


def test_a_head_that_cannot_be_found_is_refused_naming_the_key():
    with pytest.raises(VisiontuneError) as refused:
        found.torchvision_heads(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten()), "mynet")
    (line,) = str(refused.value).splitlines()
    assert "model.arch=mynet" in line and "model.head=" in line


def test_a_given_head_path_is_used_as_is():
    spec = found_spec("torchvision", "mobilenet_v3_small", "model.head=classifier.3")
    model, spec = models.build(spec, NUM_CLASSES, None)
    assert spec.heads == ("classifier.3",) and model.classifier[3].out_features == NUM_CLASSES


def test_an_unknown_arch_is_one_line_with_the_closest_names():
    with pytest.raises(VisiontuneError, match="did you mean efficientnet_b0") as refused:
        built("torchvision", "efficientnet_b00")
    assert "visiontune-models --source torchvision" in str(refused.value)


def test_preprocessing_comes_from_the_weights_metadata():
    assert built("torchvision", "vit_b_16")[1].input_size == 224
    _, effb1 = built("torchvision", "efficientnet_b1")
    assert effb1.input_size == 240  # its DEFAULT (V2) weights' crop
    _, timm_spec = built("timm", "vit_tiny_patch16_224")
    assert timm_spec.mean == pytest.approx((0.5, 0.5, 0.5)) and timm_spec.input_size == 224
    given = found_spec("torchvision", "mobilenet_v3_small", "model.input_size=96", "model.mean=[0.5,0.5,0.5]")
    _, spec = models.build(given, NUM_CLASSES, None)
    assert spec.input_size == 96 and spec.mean == (0.5, 0.5, 0.5)
    assert spec.found_params()["model.std"] == pytest.approx([0.229, 0.224, 0.225])


@pytest.mark.parametrize("source, arch", [("torchvision", "mobilenet_v3_small"), ("timm", "resnet10t")])
def test_a_state_dict_file_loads_and_every_mode_applies(source, arch, tmp_path):
    from visiontune import catalog

    torch.manual_seed(1)
    original = catalog.timm().create_model(arch) if source == "timm" else models.tv_models.get_model(arch)
    path = tmp_path / "weights.pt"
    torch.save(original.state_dict(), path)
    weights = models.resolve_weights(arch, str(path), tmp_path, source)
    for mode_name in ("feature_extract", "staged", "finetune", "scratch"):
        mode = config.mode_of(compose_cfg(f"mode={mode_name}").mode)
        prepared = models.prepare(found_spec(source, arch), mode, NUM_CLASSES, weights)
        trains = {n for n, p in prepared.module.named_parameters() if p.requires_grad}
        heads = {n for n in trains if n.startswith(tuple(f"{h}." for h in prepared.spec.heads))}
        everything = {n for n, _ in prepared.module.named_parameters()}
        assert trains == (heads if mode_name in ("feature_extract", "staged") else everything), mode_name
        own = {k: v for k, v in prepared.module.state_dict().items() if v.ndim > 1}  # random-init kernels
        same = [k for k, v in original.state_dict().items() if k in own and torch.equal(own[k], v)]
        loaded = len(same) == len(own) - 1  # all but the new head's weight
        assert loaded == mode.pretrained, mode_name


def test_timm_offline_error_names_what_to_download_and_where(monkeypatch):
    import huggingface_hub.constants

    for key, value in offline_env({}).items():
        monkeypatch.setenv(key, value)
    # HF_HUB_OFFLINE=1 as set before Python starts (the hub reads it once, at import): no retries.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    weights = models.resolve_weights("resnet10t", "DEFAULT", None, "timm")
    with pytest.raises(VisiontuneError) as refused:
        built("timm", "resnet10t", weights)
    (line,) = str(refused.value).splitlines()
    assert "timm/resnet10t" in line and "hf download" in line and "model.weights=PATH" in line


def test_config_knows_the_found_groups_before_torch():
    spec = found_spec("torchvision", "efficientnet_b0")
    assert spec.found and spec.group_names == (*config.FOUND_GROUPS, HEAD_GROUP)
    assert spec.name == "efficientnet_b0"  # runs and leaderboards name the architecture
    with pytest.raises(VisiontuneError, match="model.mean=.* must be 3 numbers"):
        found_spec("timm", "resnet10t", "model.mean=[0.5]")


@pytest.mark.parametrize(
    "source, arch, cut", [("torchvision", "mobilenet_v3_small", True), ("timm", "convnext_atto", False)]
)
def test_feature_extraction_trains_bit_for_bit_cut_or_whole(source, arch, cut, caplog):
    """Where fx cuts the model below its head the backbone runs apart, on three batches at once;
    where it cannot (convnext's layer scales cross the cut as no batch) the model runs whole, said
    in one line. Either way: the losses and the head's weights of the plain loop, at float32."""
    from helpers import cpu_training
    from visiontune import engine
    from visiontune.frozen import BackboneCache, FrozenBackbone

    caplog.set_level(logging.INFO, logger="visiontune.frozen")
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(n, 3, 32, 32, generator=generator), torch.arange(n) % 2) for n in (2, 2, 2, 1)]
    mode = config.mode_of(compose_cfg("mode=feature_extract").mode)
    results = []
    for split in (False, True):
        torch.manual_seed(0)
        prepared = models.prepare(found_spec(source, arch), mode, NUM_CLASSES, None)
        optimizer = torch.optim.SGD([p for p in prepared.module.parameters() if p.requires_grad], lr=0.1)
        frozen = FrozenBackbone(prepared.module, prepared.spec.heads) if split else None
        torch.manual_seed(3)
        training = cpu_training(prepared, optimizer)
        result = engine.train_one_epoch(training, batches, frozen=frozen, per_pass=3)
        if split:  # a sweep's later job finds its val outputs by this key, cut or whole
            val = SimpleNamespace(identity="val batches")
            assert BackboneCache(frozen, 2**20).shared_key(val, training.runtime) is not None
        head = prepared.module.get_submodule(prepared.spec.head)
        results.append((result.loss, result.acc, [p.detach().clone() for p in head.parameters()]))
    (loss, acc, weights), (split_loss, split_acc, split_weights) = results
    assert (split_loss, split_acc) == (loss, acc)
    assert all(torch.equal(a, b) for a, b in zip(weights, split_weights, strict=True))
    fallback = [r.getMessage() for r in caplog.records if "cannot cut" in r.getMessage()]
    assert len(fallback) == (0 if cut else 1)


# torchvision's builders rebuild and export as for the six presets (tests/test_commands_export.py);
# timm's create_model route is the new one, so it runs by default.
@pytest.mark.parametrize(
    "source, arch",
    [pytest.param("torchvision", "mobilenet_v3_small", marks=pytest.mark.slow), ("timm", "resnet10t")],
)
def test_logged_and_onnx_models_score_as_the_trained_one(source, arch, tmp_path):
    """The logged model's files rebuild the module (timm's through timm.create_model) and the ONNX
    export scores alike; both carry the input size and normalisation found."""
    from helpers import like_trained
    from visiontune import portable
    from visiontune.classifier import Classifier
    from visiontune.commands import export

    mode = config.mode_of(compose_cfg("mode=scratch").mode)
    torch.manual_seed(0)
    prepared = models.prepare(found_spec(source, arch, "model.input_size=64"), mode, 2, None)
    spec = prepared.spec
    module = like_trained(prepared.module, 64)
    classifier = Classifier(module, ["ants", "bees"], 64, spec.name, spec.arch, mean=spec.mean, std=spec.std)
    portable.save(tmp_path / "data", module, classifier.spec())
    saved = portable.read_spec(tmp_path / "data")
    assert (saved["source"], saved["mean"], saved["input_size"]) == (source, list(spec.mean), 64)
    rebuilt = portable.load_module(tmp_path / "data", saved)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images), module(images))
    parity = export.export_onnx(classifier, tmp_path / "m.onnx")
    assert parity.max_diff < 1e-4 and 1e-3 < parity.largest_logit < 100
