"""Build a torchvision classifier, load its weights, swap its head, freeze what the mode freezes.

Every per-architecture fact (builder name, head paths, builder arguments) arrives as an
argument from the model's YAML; nothing here branches on the architecture.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision import models as tv_models

from visiontune import VisiontuneError

IMAGENET_CLASSES = 1000


def build_model(
    arch: str,
    heads: Sequence[str],
    num_classes: int,
    weights: str | None,
    pretrained_kwargs: Mapping | None = None,
    scratch_kwargs: Mapping | None = None,
) -> nn.Module:
    """A torchvision `arch` with `weights` (or random init when None) and fresh heads."""
    if weights is None:
        model = tv_models.get_model(arch, weights=None, **(scratch_kwargs or {}))
    else:
        model = load_pretrained(arch, weights, pretrained_kwargs or {})
    for path in heads:
        replace_head(model, path, num_classes)
    return model


def is_weights_name(arch: str, weights: str) -> bool:
    """DEFAULT or a torchvision weights name (IMAGENET1K_V1, ...), as opposed to a file path."""
    return weights == "DEFAULT" or weights in tv_models.get_model_weights(arch).__members__


def load_pretrained(arch: str, weights: str, pretrained_kwargs: Mapping) -> nn.Module:
    """The 1000-class ImageNet model: from torchvision's weights API or a state-dict file."""
    if is_weights_name(arch, weights):
        return _from_weights_api(arch, tv_models.get_model_weights(arch)[weights])
    model = tv_models.get_model(arch, weights=None, num_classes=IMAGENET_CLASSES, **pretrained_kwargs)
    model.load_state_dict(_read_state_dict(Path(weights), arch, model))
    return model


def _from_weights_api(arch: str, weights: tv_models.WeightsEnum) -> nn.Module:
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        return tv_models.get_model(arch, weights=weights)
    except Exception as err:  # no network, a corrupt cache file, a refused connection
        raise VisiontuneError(
            f"could not load pretrained weights {weights} for {arch}: {err}.\n"
            f"They download from {weights.url} into {cached} (TORCH_HOME sets the cache). "
            f"On an offline machine copy that file there, or pass model.weights=PATH to a "
            f"state-dict file, or train without pretrained weights (mode=scratch)."
        ) from err


def _read_state_dict(path: Path, arch: str, model: nn.Module) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise VisiontuneError(
            f"model.weights={path}: no such file. Pass a state-dict file saved from torchvision's "
            f"{arch} (1000 classes), model.weights=DEFAULT for torchvision's ImageNet weights, "
            f"or mode=scratch."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise VisiontuneError(
            f"model.weights={path} is not a readable PyTorch state dict ({err}). "
            f"Save one with torch.save(model.state_dict(), PATH)."
        ) from err
    if not isinstance(state, Mapping):
        raise VisiontuneError(
            f"model.weights={path} holds a {type(state).__name__}, not a state dict. "
            f"Save one with torch.save(model.state_dict(), PATH)."
        )
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    reshaped = sorted(k for k in expected.keys() & state.keys() if state[k].shape != expected[k].shape)
    if missing or unexpected or reshaped:
        raise VisiontuneError(
            f"model.weights={path} does not fit torchvision's {arch} with {IMAGENET_CLASSES} classes: "
            f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys "
            f"{unexpected[:3]}, {len(reshaped)} of another shape {reshaped[:3]}. "
            f"Is it a state dict of another architecture? Pick the matching model=..."
        )
    return dict(state)


def replace_head(model: nn.Module, path: str, num_classes: int) -> None:
    """Swap the layer at module path `path` for a freshly initialised `num_classes` one."""
    try:
        old = model.get_submodule(path)
    except AttributeError as err:
        raise VisiontuneError(f"{type(model).__name__} has no head at module path {path!r}") from err
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    elif isinstance(old, nn.Conv2d):
        new = nn.Conv2d(old.in_channels, num_classes, kernel_size=old.kernel_size, stride=old.stride)
    else:
        raise VisiontuneError(
            f"head {path!r} is a {type(old).__name__}; visiontune replaces Linear and Conv2d heads"
        )
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path), name, new)


def freeze_backbone(model: nn.Module, heads: Sequence[str], freeze_norm_stats: bool) -> list[nn.Module]:
    """Train only the heads. Returns the norm layers that must stay in eval mode."""
    model.requires_grad_(False)
    for path in heads:
        model.get_submodule(path).requires_grad_(True)
    if not freeze_norm_stats:
        return []
    return [
        m
        for m in model.modules()
        if isinstance(m, _BatchNorm) and not any(p.requires_grad for p in m.parameters())
    ]


def set_train_mode(model: nn.Module, frozen_norms: Sequence[nn.Module]) -> None:
    """model.train(), except that frozen norm layers keep their running statistics."""
    model.train()
    for module in frozen_norms:
        module.eval()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
