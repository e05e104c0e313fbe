"""What a preset writes by hand, found in a built model: its head(s), layer groups and preprocessing.

torchvision: the head is the last Linear or 1x1 Conv with 1000 outputs (earlier ones are auxiliary
heads); the backbone's units (stem, stages, final norm) come from the module tree. timm: the head is
get_classifier()'s, the units are the model's group_matcher groups. Either way the units are split,
in order, into the early / middle / late groups that staged training and lr_decay walk.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from visiontune import VisiontuneError
from visiontune.config import FOUND_GROUPS, ModelSpec

IMAGENET_CLASSES = 1000
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# A backbone found in fewer units than this is taken apart further (its largest unit first), so
# that early / middle / late each get some of it.
MIN_UNITS = 6


@dataclass(frozen=True)
class Preprocessing:
    """The input the weights were trained on: crop side, resize side and normalisation."""

    input_size: int
    resize_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def complete(spec: ModelSpec, model: nn.Module, weights) -> tuple[ModelSpec, dict]:
    """(spec with its head, groups, input size and normalisation found where it leaves them out,
    the builder arguments that rebuild `model`), for a model built as its weights were trained."""
    kwargs = dict(spec.scratch_kwargs if weights is None else spec.pretrained_kwargs)
    if not spec.found:  # a preset: its YAML says it all
        return replace(spec, mean=spec.mean or IMAGENET_MEAN, std=spec.std or IMAGENET_STD), kwargs
    if spec.source == "timm":
        heads = (spec.head or timm_head(model, spec.arch),)
        units = timm_units(model, heads) or tree_units(model, heads)
        preprocessing = timm_preprocessing(model)
    else:
        heads = (spec.head,) if spec.head else _torchvision_heads(model, spec.arch, kwargs)
        units = tree_units(model, heads)
        preprocessing = torchvision_preprocessing(spec.arch, weights)
        # A ViT takes the one size it was built for: vit_h_14's DEFAULT weights (518 px) build it at
        # 518, random init or a state dict at 224.
        if isinstance(getattr(model, "image_size", None), int):
            preprocessing = replace(preprocessing, input_size=model.image_size)
    found = replace(
        spec,
        head=heads[0],
        layer_groups=spec.layer_groups or split_units(units),
        input_size=spec.input_size or preprocessing.input_size,
        mean=spec.mean or preprocessing.mean,
        std=spec.std or preprocessing.std,
    )
    return found, kwargs


def _torchvision_heads(model: nn.Module, arch: str, kwargs: dict) -> tuple[str]:
    """The main head; auxiliary heads (inception_v3, googlenet) are dropped, as torchvision does for
    aux_logits=False: training returns the main logits alone (model=inception keeps its aux head)."""
    head, aux = torchvision_heads(model, arch)
    if aux and getattr(model, "aux_logits", False):
        for path in aux:
            setattr(model, path.split(".")[0], None)
        model.aux_logits = False
        kwargs["aux_logits"] = False
    if hasattr(model, "transform_input"):  # set by the weights API: the rebuilt model needs the same
        kwargs["transform_input"] = bool(model.transform_input)
    return (head,)


# --- heads ---------------------------------------------------------------------------------------------


def classifier_layers(model: nn.Module, num_outputs: int = IMAGENET_CLASSES) -> list[str]:
    """Module paths of every Linear or 1x1 Conv2d with `num_outputs` outputs, in module order."""
    return [path for path, module in model.named_modules() if _outputs(module) == num_outputs]


def _outputs(module: nn.Module) -> int | None:
    """A classifier-like layer's output count: a Linear's, or a 1x1 Conv2d's."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1):
        return module.out_channels
    return None


def torchvision_heads(model: nn.Module, arch: str) -> tuple[str, list[str]]:
    """(the head, the auxiliary heads) of a torchvision model built with 1000 classes."""
    found = classifier_layers(model)
    if not found:
        raise no_head(arch, "no Linear or 1x1 Conv with 1000 outputs")
    return found[-1], found[:-1]


def timm_head(model: nn.Module, arch: str) -> str:
    """The module path of timm's get_classifier() (the main one, for models with two)."""
    classifier = model.get_classifier()
    if isinstance(classifier, tuple | list):  # distilled models: (head, head_dist)
        classifier = classifier[0]
    for path, module in model.named_modules():
        if module is classifier and isinstance(module, nn.Linear | nn.Conv2d):
            return path
    raise no_head(arch, f"get_classifier() is a {type(classifier).__name__}, not a Linear or Conv2d")


def no_head(arch: str, why: str) -> VisiontuneError:
    return VisiontuneError(
        f"model.arch={arch}: its classifier layer could not be found ({why}); give its module path "
        f"with model.head=<path> (print the model to see the paths), or write a preset in conf/model/"
    )


# --- layer groups --------------------------------------------------------------------------------------


def split_units(units: list[list[str]]) -> dict[str, tuple[str, ...]]:
    """Units (each a list of module paths or parameter names), input first, cut into FOUND_GROUPS."""
    count, parts = len(units), len(FOUND_GROUPS)
    bounds = [round(i * count / parts) for i in range(parts + 1)]
    return {
        name: tuple(path for unit in units[bounds[i] : bounds[i + 1]] for path in unit)
        for i, name in enumerate(FOUND_GROUPS)
    }


def tree_units(model: nn.Module, heads: tuple[str, ...]) -> list[list[str]]:
    """The backbone's units from the module tree: the top-level modules with parameters, the heads
    left out, a module holding a head or the largest one taken apart until there are MIN_UNITS."""
    units = [""]
    while True:
        holding = [u for u in units if any(_inside(h, u) and h != u for h in heads)]
        if holding:
            unit = holding[0]
        else:
            parents = [u for u in units if _has_children(model, u)]
            if len(units) >= MIN_UNITS or not parents:
                break
            unit = max(parents, key=lambda u: _size(model, u))
        at = units.index(unit)
        units[at : at + 1] = _children(model, unit, heads)
    return [[u] for u in units]


def _inside(path: str, unit: str) -> bool:
    return unit == "" or path == unit or path.startswith(f"{unit}.")


def _children(model: nn.Module, unit: str, heads: tuple[str, ...]) -> list[str]:
    """A module unit's own parameters, then its children that hold parameters, heads left out."""
    try:
        module = model.get_submodule(unit)
    except AttributeError:  # a parameter name: no children
        return [unit]
    prefix = f"{unit}." if unit else ""
    own = [f"{prefix}{name}" for name, _ in module.named_parameters(recurse=False)]
    children = [
        f"{prefix}{name}"
        for name, child in module.named_children()
        if f"{prefix}{name}" not in heads and any(True for _ in child.parameters())
    ]
    return own + children


def _has_children(model: nn.Module, unit: str) -> bool:
    try:
        return any(any(True for _ in child.parameters()) for child in model.get_submodule(unit).children())
    except AttributeError:  # a parameter name
        return False


def _size(model: nn.Module, unit: str) -> int:
    try:
        return sum(p.numel() for p in model.get_submodule(unit).parameters())
    except AttributeError:
        return 0


def timm_units(model: nn.Module, heads: tuple[str, ...]) -> list[list[str]] | None:
    """timm's own coarse groups (stem, stages, ...) as lists of parameter names, heads left out;
    None for a model without group_matcher."""
    from timm.models import group_parameters

    if not hasattr(model, "group_matcher"):
        return None
    try:
        groups = group_parameters(model, model.group_matcher(coarse=True))
    except NotImplementedError:
        return None
    units = [
        [name for name in names if not any(_inside(name, h) for h in heads)]
        for _, names in sorted(groups.items())
    ]
    return [unit for unit in units if unit]


def describe(spec: ModelSpec) -> str:
    """The groups found, on one line: each group's first and last path."""
    parts = []
    for name, paths in spec.layer_groups.items():
        shown = ", ".join(paths) if len(paths) <= 2 else f"{paths[0]} .. {paths[-1]}"
        parts.append(f"{name}: {shown or '(empty)'}")
    return "; ".join(parts)


# --- preprocessing -------------------------------------------------------------------------------------


def torchvision_preprocessing(arch: str, weights) -> Preprocessing:
    """From the weights' transforms() (crop, resize, mean, std): the weights named, else the
    architecture's DEFAULT ones (a state-dict file or random init: their metadata, nothing downloaded)."""
    from torchvision import models

    entries = models.get_model_weights(arch)
    name = weights.name if weights is not None and weights.kind == "torchvision" else "DEFAULT"
    transform = entries[name].transforms()
    return Preprocessing(
        input_size=int(transform.crop_size[0]),
        resize_size=int(transform.resize_size[0]),
        mean=tuple(float(v) for v in transform.mean),
        std=tuple(float(v) for v in transform.std),
    )


def timm_preprocessing(model: nn.Module) -> Preprocessing:
    """From the model's pretrained_cfg, as timm's resolve_data_config reads it."""
    from timm.data import resolve_data_config

    config = resolve_data_config({}, model=model)
    size = int(config["input_size"][-1])
    return Preprocessing(
        input_size=size,
        resize_size=int(size / config.get("crop_pct", 1.0)),
        mean=tuple(float(v) for v in config["mean"]),
        std=tuple(float(v) for v in config["std"]),
    )
