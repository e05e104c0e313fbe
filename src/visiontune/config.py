"""The composed config read into typed values and checked, before torch or MLflow is imported.

The YAML files stay plain (no structured-config registration: Hydra 1.3's submitit launcher
cannot compose apps that register them, hydra issue 2697); this module is where their values
get names, types and limits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources

from omegaconf import DictConfig, OmegaConf

from visiontune import VisiontuneError

PRECISIONS = ("off", "bf16", "fp16")


@dataclass(frozen=True)
class ModelSpec:
    """What visiontune must know of one torchvision architecture (one conf/model/*.yaml)."""

    name: str  # the config option: resnet, inception, ...
    arch: str  # torchvision.models builder name
    head: str  # module path of the classifier layer that gets num_classes outputs
    input_size: int
    aux_head: str | None = None  # a second classifier whose output training also returns
    min_input_size: int = 1
    aux_loss_weight: float = 0.0  # 0 with an aux_head: its output is computed and ignored
    pretrained_kwargs: Mapping = field(default_factory=dict)  # builder arguments the weights expect
    scratch_kwargs: Mapping = field(default_factory=dict)  # builder arguments for random init

    @property
    def heads(self) -> tuple[str, ...]:
        return (self.head,) if self.aux_head is None else (self.head, self.aux_head)


@dataclass(frozen=True)
class Mode:
    """A transfer-learning mode (one conf/mode/*.yaml): where weights come from and what trains."""

    name: str
    pretrained: bool
    train_backbone: bool
    freeze_norm_stats: bool  # with a frozen backbone: its BatchNorm statistics stay too


def model_spec(model_cfg: DictConfig) -> ModelSpec:
    """The spec of the composed `model` group; `weights` is the user's choice, not a fact of it."""
    facts = OmegaConf.to_container(model_cfg, resolve=True)
    facts.pop("weights", None)
    try:
        spec = ModelSpec(**facts)
    except TypeError as err:  # an unknown or missing key in a model YAML
        raise VisiontuneError(f"model={model_cfg.get('name')}: {err}") from err
    if spec.aux_loss_weight and spec.aux_head is None:
        raise VisiontuneError(
            f"model.aux_loss_weight={spec.aux_loss_weight}: {spec.name} has no auxiliary head; "
            f"set model.aux_loss_weight=0"
        )
    return spec


def mode_of(mode_cfg: DictConfig) -> Mode:
    return Mode(**OmegaConf.to_container(mode_cfg, resolve=True))


def model_names() -> list[str]:
    """The model options the package ships (conf/model/*.yaml): the architecture table's rows."""
    folder = resources.files("visiontune.conf") / "model"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def check_values(cfg: DictConfig) -> None:
    """Refuse values no training can use, naming the key, the value and the fix."""
    for key, example in (("epochs", 15), ("batch_size", 8), ("optimizer.lr", 0.001)):
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            raise VisiontuneError(f"{key}={value} must be a positive number, e.g. {key}={example}")
    spec = model_spec(cfg.model)
    if cfg.model.input_size < spec.min_input_size:
        raise VisiontuneError(
            f"model.input_size={spec.input_size} is too small for {spec.name}: it needs at least "
            f"{spec.min_input_size} px (model.input_size={spec.min_input_size})"
        )
    if cfg.num_workers != "auto" and (not isinstance(cfg.num_workers, int) or cfg.num_workers < 0):
        raise VisiontuneError(f"num_workers={cfg.num_workers} must be auto or a whole number, 0 or more")
    if str(cfg.precision) not in PRECISIONS:
        raise VisiontuneError(f"precision={cfg.precision} must be one of {', '.join(PRECISIONS)}")
    mode = mode_of(cfg.mode)
    if mode.pretrained and cfg.model.weights is None:
        raise VisiontuneError(
            f"mode={mode.name} starts from pretrained weights but model.weights is null: "
            f"set model.weights=DEFAULT or a state-dict path, or use mode=scratch"
        )
