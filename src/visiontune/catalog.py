"""The architectures model=torchvision and model=timm can build: their names, checked and listed."""

from __future__ import annotations

import difflib
import fnmatch

from visiontune import VisiontuneError

TIMM_INSTALL = "pip install 'visiontune[timm]'"


def timm():
    """The timm package, or one line that says how to install it."""
    try:
        import timm as package
    except ImportError:
        raise VisiontuneError(f"model=timm needs the timm package: {TIMM_INSTALL}") from None
    return package


def names(source: str, pattern: str = "*") -> list[str]:
    """The trainable classification models of `source` whose names match the glob `pattern`."""
    if source == "timm":
        return sorted(timm().list_models(pattern))
    from torchvision import models

    return sorted(fnmatch.filter(models.list_models(module=models), pattern))


def check_arch(source: str, arch: str) -> None:
    """`arch` is a model `source` builds, or one line with the closest names and where to see them all."""
    # timm's is_model takes a name with its pretrained tag too: convnext_atto.d2_in1k
    if timm().is_model(arch) if source == "timm" else arch in names(source):
        return
    close = difflib.get_close_matches(arch, names(source), n=3)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise VisiontuneError(
        f"model.arch={arch} is not a {source} classification model: {hint}"
        f"visiontune-models --source {source} lists them"
    )


def timm_model(arch: str, weights, kwargs: dict):
    """timm's `arch` at its pretrained class count: random (weights None or an MLflow model's, loaded
    later), timm's pretrained weights through its Hugging Face Hub cache, or a state-dict file."""
    from pathlib import Path

    from visiontune import models

    package = timm()
    if weights is None or weights.kind in ("mlflow", "file"):
        model = package.create_model(arch, pretrained=False, **kwargs)
        if weights is not None and weights.kind == "file":
            model.load_state_dict(models.read_state_dict(Path(weights.name), arch, model))
        return model
    try:
        return package.create_model(arch, pretrained=True, **kwargs)
    except Exception as err:  # no network, no cached file, a refused connection
        raise VisiontuneError(_timm_offline(package, arch, err)) from err


def _timm_offline(package, arch: str, err: Exception) -> str:
    """One line: which pretrained file is missing, where to put it, and the ways round it."""
    from huggingface_hub.constants import HF_HUB_CACHE

    hub_id = package.create_model(arch, pretrained=False).pretrained_cfg.get("hf_hub_id") or f"timm/{arch}"
    first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    return (
        f"could not load timm's pretrained weights for {arch} ({first}). They download from the "
        f"Hugging Face Hub repository {hub_id} into {HF_HUB_CACHE} (HF_HOME sets the cache). On an "
        f"offline machine run `hf download {hub_id}` where there is a network and copy the cache "
        f"there, or pass model.weights=PATH to a state-dict file, or train without pretrained "
        f"weights (mode=scratch)."
    )
