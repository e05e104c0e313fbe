"""Build a torchvision classifier, load its weights, swap its heads, and apply the mode: once.

Every per-architecture fact arrives in a ModelSpec (from the model's YAML); nothing here
branches on the architecture, and the mode's flags are read in `prepare` alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision import models as tv_models

from visiontune import VisiontuneError
from visiontune.config import Mode, ModelSpec

IMAGENET_CLASSES = 1000


MLFLOW_MODEL_PREFIXES = ("runs:/", "models:/")


@dataclass(frozen=True)
class Weights:
    """Pretrained weights, their source decided once: torchvision's weights API, a state-dict
    file, or a model logged in MLflow (a visiontune run's, to fine-tune it further)."""

    arch: str
    name: str  # a torchvision weights name, an absolute file path, or runs:/<id>/model, models:/...
    kind: str  # "torchvision", "file" or "mlflow"

    def __str__(self) -> str:  # what the run records
        return self.name


def resolve_weights(arch: str, value: str | None, launch_dir: Path) -> Weights | None:
    """`model.weights` as given: None, a weights name, an MLflow model URI, or a launch-dir-relative file."""
    if value is None:
        return None
    value = str(value)
    if value == "DEFAULT" or value in tv_models.get_model_weights(arch).__members__:
        return Weights(arch, value, kind="torchvision")
    if value.startswith(MLFLOW_MODEL_PREFIXES):
        return Weights(arch, value, kind="mlflow")
    return Weights(arch, str((launch_dir / value).resolve()), kind="file")


@dataclass(frozen=True)
class PreparedModel:
    """A model as its mode wants it, with what the engine must know to train and evaluate it."""

    module: nn.Module
    spec: ModelSpec
    weights: Weights | None
    frozen_norms: tuple[nn.Module, ...]  # norm layers kept in eval mode while the rest trains
    # The backbone is a fixed function (frozen, in eval mode): evaluation may cache its output.
    cache_backbone: bool

    def train_mode(self) -> None:
        """module.train(), except that frozen norm layers keep their running statistics."""
        self.module.train()
        for norm in self.frozen_norms:
            norm.eval()

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameter counts."""
        params = list(self.module.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def prepare(spec: ModelSpec, mode: Mode, num_classes: int, weights: Weights | None) -> PreparedModel:
    """The one place a mode's flags are read: weights, heads, what trains, what stays frozen."""
    module = build_model(spec, num_classes, weights if mode.pretrained else None)
    frozen_norms: tuple[nn.Module, ...] = ()
    if not mode.train_backbone:
        frozen_norms = freeze_backbone(module, spec.heads, mode.freeze_norm_stats)
    return PreparedModel(
        module,
        spec,
        weights if mode.pretrained else None,
        frozen_norms,
        cache_backbone=not mode.train_backbone and mode.freeze_norm_stats,
    )


def build_model(spec: ModelSpec, num_classes: int, weights: Weights | None) -> nn.Module:
    """`spec.arch` with `weights` (random init when None) and fresh `num_classes` heads."""
    if weights is not None and weights.kind == "mlflow":
        return _from_logged_model(spec, weights.name, num_classes)
    if weights is None:
        model = tv_models.get_model(spec.arch, weights=None, **spec.scratch_kwargs)
    elif weights.kind == "torchvision":
        model = _from_weights_api(spec.arch, tv_models.get_model_weights(spec.arch)[weights.name])
    else:
        model = tv_models.get_model(
            spec.arch, weights=None, num_classes=IMAGENET_CLASSES, **spec.pretrained_kwargs
        )
        model.load_state_dict(_read_state_dict(Path(weights.name), spec.arch, model))
    for path in spec.heads:  # loaded at 1000 classes, then swapped: torchvision refuses other counts
        replace_head(model, path, num_classes)
    return model


def _from_logged_model(spec: ModelSpec, uri: str, num_classes: int) -> nn.Module:
    """A model logged by an earlier visiontune run: its backbone, and its heads where the classes match.

    Heads with another class count are made new: fine-tuning a fine-tuned model on new data.
    """
    from visiontune import store

    logged = store.load_model(uri).state_dict()
    model = tv_models.get_model(spec.arch, weights=None, **spec.pretrained_kwargs)
    for path in spec.heads:
        replace_head(model, path, num_classes)
    own = model.state_dict()
    heads = {k for k in own if k.startswith(tuple(f"{h}." for h in spec.heads))}
    keep_heads = all(k in logged and logged[k].shape == own[k].shape for k in heads)
    wanted = [k for k in own if keep_heads or k not in heads]
    unfit = [k for k in wanted if k not in logged or logged[k].shape != own[k].shape]
    if unfit:
        raise VisiontuneError(
            f"model.weights={uri} is not a {spec.arch} model ({len(unfit)} tensors missing or of another "
            f"shape, e.g. {unfit[:2]}): pick the model=... it was trained as"
        )
    model.load_state_dict({k: logged[k] for k in wanted}, strict=False)
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


def freeze_backbone(
    model: nn.Module, heads: tuple[str, ...], freeze_norm_stats: bool
) -> tuple[nn.Module, ...]:
    """Train only the heads. Returns the norm layers that must stay in eval mode."""
    model.requires_grad_(False)
    for path in heads:
        model.get_submodule(path).requires_grad_(True)
    if not freeze_norm_stats:
        return ()
    return tuple(
        m
        for m in model.modules()
        if isinstance(m, _BatchNorm) and not any(p.requires_grad for p in m.parameters())
    )
