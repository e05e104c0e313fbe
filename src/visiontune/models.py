"""Build a torchvision classifier, load its weights, swap its heads, and apply the mode: once.

Every per-architecture fact arrives in a ModelSpec (from the model's YAML); nothing here
branches on the architecture, and the mode's flags are read in `prepare` alone.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision import models as tv_models

from visiontune import VisiontuneError, catalog, found, portable
from visiontune.config import HEAD_GROUP, Mode, ModelSpec

IMAGENET_CLASSES = 1000
log = logging.getLogger("visiontune")


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


def resolve_weights(
    arch: str, value: str | None, launch_dir: Path, source: str = "torchvision"
) -> Weights | None:
    """`model.weights` as given: None, a weights name, an MLflow model URI, or a launch-dir-relative file."""
    if value is None:
        return None
    value = str(value)
    if source == "timm" and value == "DEFAULT":
        return Weights(arch, value, kind="timm")  # timm's pretrained weights, through its hub cache
    if source != "timm" and (value == "DEFAULT" or value in _weights_names(arch)):
        return Weights(arch, value, kind="torchvision")
    if value.startswith(MLFLOW_MODEL_PREFIXES):
        return Weights(arch, value, kind="mlflow")
    return Weights(arch, str((launch_dir / value).resolve()), kind="file")


def _weights_names(arch: str) -> tuple[str, ...]:
    try:
        return tuple(tv_models.get_model_weights(arch).__members__)
    except (ValueError, KeyError):  # not a torchvision model: check_arch says so when it is built
        return ()


@dataclass
class PreparedModel:
    """A model as its mode wants it, with what the engine must know to train and evaluate it.

    What trains may change between epochs (mode=staged): `enter_epoch` applies the mode's
    plan for an epoch, and the fields below it describe the epoch being trained.
    """

    module: nn.Module
    spec: ModelSpec
    mode: Mode
    weights: Weights | None
    groups: dict[str, tuple[nn.Parameter, ...]]  # layer group name -> its parameters, input first
    trainable: tuple[str, ...] = ()  # the groups training in this epoch
    frozen_norms: tuple[nn.Module, ...] = ()  # norm layers kept in eval mode while the rest trains
    # The backbone is a fixed function (frozen, in eval mode): evaluation may cache its output.
    cache_backbone: bool = False

    def enter_epoch(self, epoch: int) -> bool:
        """Set what trains in `epoch` (1-based); True where that changed."""
        trainable = self.mode.trainable_groups(epoch, tuple(self.groups))
        if trainable == self.trainable:
            return False
        self.trainable = trainable
        for name, params in self.groups.items():
            for param in params:
                param.requires_grad_(name in trainable)
        self.find_frozen_norms()
        self.cache_backbone = trainable == (HEAD_GROUP,) and self.mode.freeze_norm_stats
        return True

    def find_frozen_norms(self) -> None:
        """The norm layers of the groups not training now, which keep their statistics where the
        mode says so (found again after layers are swapped, as for SyncBatchNorm)."""
        frozen = [p for name, params in self.groups.items() if name not in self.trainable for p in params]
        self.frozen_norms = _norms_of(self.module, frozen) if self.mode.freeze_norm_stats else ()

    def unfreezes_at(self, epoch: int) -> bool:
        """Whether `epoch` trains more layer groups than the epoch before it."""
        names = tuple(self.groups)
        return epoch > 1 and self.mode.trainable_groups(epoch - 1, names) != self.mode.trainable_groups(
            epoch, names
        )

    @property
    def fixed_backbone(self) -> bool:
        """Whether the backbone is a fixed function in every epoch (feature_extract)."""
        return self.mode.freeze_norm_stats and not self.mode.train_backbone

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
    """The one place a mode is applied: weights, heads, and what trains in the first epoch."""
    weights = weights if mode.pretrained else None
    module, complete = build(spec, num_classes, weights)
    prepared = PreparedModel(module, complete, mode, weights, layer_groups(module, complete))
    if spec.found:
        log.info(
            "%s: head %s; layer groups %s", spec.arch, ", ".join(complete.heads), found.describe(complete)
        )
    prepared.enter_epoch(1)
    return prepared


def layer_groups(module: nn.Module, spec: ModelSpec) -> dict[str, tuple[nn.Parameter, ...]]:
    """spec's layer groups as parameters, input first: each parameter in the group of the longest
    module path containing it (AuxLogits is in a middle group, its head AuxLogits.fc in `head`)."""
    owner = {path: name for name, paths in spec.layer_groups.items() for path in paths}
    owner |= {path: HEAD_GROUP for path in spec.heads}
    names = dict(module.named_parameters())
    for path in (p for p in owner if p not in names):  # a parameter's name (timm's groups), or a module
        try:
            module.get_submodule(path)
        except AttributeError:
            raise VisiontuneError(
                f"conf/model/{spec.name}.yaml: {spec.arch} has no module {path!r} for its layer groups"
            ) from None
    groups: dict[str, list[nn.Parameter]] = {name: [] for name in spec.group_names}
    for name, param in names.items():
        paths = [p for p in owner if name == p or name.startswith(f"{p}.")]
        if not paths:
            raise VisiontuneError(
                f"conf/model/{spec.name}.yaml: parameter {name} of {spec.arch} is in no layer group; "
                f"add its module to one of layer_groups"
            )
        groups[owner[max(paths, key=len)]].append(param)
    return {name: tuple(params) for name, params in groups.items()}


def _norms_of(module: nn.Module, params: list[nn.Parameter]) -> tuple[nn.Module, ...]:
    """The norm layers whose parameters are all among `params`."""
    ids = {id(p) for p in params}
    return tuple(
        m
        for m in module.modules()
        if isinstance(m, _BatchNorm)
        and (own := list(m.parameters(recurse=False)))
        and all(id(p) in ids for p in own)
    )


def build_model(spec: ModelSpec, num_classes: int, weights: Weights | None) -> nn.Module:
    """`spec.arch` with `weights` (random init when None) and fresh `num_classes` heads."""
    return build(spec, num_classes, weights)[0]


def build(spec: ModelSpec, num_classes: int, weights: Weights | None) -> tuple[nn.Module, ModelSpec]:
    """The model with fresh `num_classes` heads, and its spec with what was found in it filled in
    (model=torchvision|timm). The module carries what a logged model needs to be rebuilt from its
    tensors alone (classifier.spec, portable.py)."""
    model = _imagenet_model(spec, weights)
    spec, kwargs = found.complete(spec, model, weights)
    _swap_heads(model, spec, num_classes)
    if weights is not None and weights.kind == "mlflow":
        _load_logged_model(model, spec, weights.name)
    build_facts = {"builder_kwargs": kwargs, "heads": list(spec.heads), "source": spec.source}
    setattr(model, portable.BUILD_ATTRIBUTE, build_facts)
    return model, spec


def _imagenet_model(spec: ModelSpec, weights: Weights | None) -> nn.Module:
    """`spec.arch` as its weights were trained (1000 ImageNet classes), the weights loaded
    (an MLflow model's are loaded once the heads are swapped)."""
    if spec.found:
        catalog.check_arch(spec.source, spec.arch)
    # The weights API's builder arguments are the pretrained ones (conf/model/inception.yaml).
    kwargs = dict(spec.scratch_kwargs if weights is None else spec.pretrained_kwargs)
    if spec.source == "timm":
        return catalog.timm_model(spec.arch, weights, kwargs)
    if weights is None or weights.kind == "mlflow":
        return tv_models.get_model(spec.arch, weights=None, **kwargs)
    if weights.kind == "torchvision":
        return _from_weights_api(spec.arch, tv_models.get_model_weights(spec.arch)[weights.name])
    model = tv_models.get_model(spec.arch, weights=None, num_classes=IMAGENET_CLASSES, **kwargs)
    model.load_state_dict(read_state_dict(Path(weights.name), spec.arch, model))
    return model


def _swap_heads(model: nn.Module, spec: ModelSpec, num_classes: int) -> None:
    """Heads loaded at 1000 classes, then swapped: torchvision refuses other counts."""
    if spec.source == "timm":
        model.reset_classifier(num_classes)  # timm's own: the head at the same path, fresh
        return
    for path in spec.heads:
        replace_head(model, path, num_classes)


def _load_logged_model(model: nn.Module, spec: ModelSpec, uri: str) -> None:
    """A model logged by an earlier visiontune run: its backbone, and its heads where the classes match.

    Heads with another class count stay new: fine-tuning a fine-tuned model on new data.
    """
    from visiontune import store

    logged = store.load_model(uri).state_dict()
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


def read_state_dict(path: Path, arch: str, model: nn.Module) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise VisiontuneError(
            f"model.weights={path}: no such file. Pass a state-dict file saved from {arch} "
            f"(1000 classes), model.weights=DEFAULT for its ImageNet weights, or mode=scratch."
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
            f"model.weights={path} does not fit {arch} as its weights were trained: "
            f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys "
            f"{unexpected[:3]}, {len(reshaped)} of another shape {reshaped[:3]}. "
            f"Is it a state dict of another architecture? Pick the matching model=..."
        )
    return dict(state)


def replace_head(model: nn.Module, path: str, num_classes: int) -> None:
    """Swap the layer at module path `path` for a freshly initialised `num_classes` one (the same
    swap a logged model's own code makes when it is rebuilt)."""
    try:
        portable.replace_head(model, path, num_classes)
    except portable.ModelFileError as err:
        raise VisiontuneError(str(err)) from None
