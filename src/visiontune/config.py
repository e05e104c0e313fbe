"""The composed config read into typed values and checked, before torch or MLflow is imported.

The YAML files stay plain (no structured-config registration: Hydra 1.3's submitit launcher
cannot compose apps that register them, hydra issue 2697); this module is where their values
get names, types and limits.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from visiontune import VisiontuneError

PRECISIONS = ("auto", "off", "bf16", "fp16")


@dataclass(frozen=True)
class ModelSpec:
    """What visiontune must know of one architecture: a preset's conf/model/*.yaml, or, for
    model=torchvision / model=timm, what models.prepare finds in the built model (head: null)."""

    name: str  # the config option: resnet, inception, ...; the arch itself for model=torchvision|timm
    arch: str  # torchvision.models builder name, or timm model name
    head: str | None = None  # module path of the classifier layer that gets num_classes outputs; null: found
    input_size: int | None = None  # null: the weights' own crop size
    source: str = "torchvision"  # the library that builds `arch`: torchvision or timm
    aux_head: str | None = None  # a second classifier whose output training also returns
    min_input_size: int = 1
    # Training batches smaller than this crash the model: batch norm on a 1x1 map needs 2 images.
    min_batch_size: int = 1
    aux_loss_weight: float = 0.0  # 0 with an aux_head: its output is computed and ignored
    pretrained_kwargs: Mapping = field(default_factory=dict)  # builder arguments the weights expect
    scratch_kwargs: Mapping = field(default_factory=dict)  # builder arguments for random init
    # The layers below the heads, input first: group name -> module paths. The heads are the last group.
    # Empty: found in the built model and split into FOUND_GROUPS.
    layer_groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    mean: tuple[float, ...] | None = None  # per-channel normalisation; null: the weights' own (ImageNet's)
    std: tuple[float, ...] | None = None

    @property
    def heads(self) -> tuple[str, ...]:
        return (self.head,) if self.aux_head is None else (self.head, self.aux_head)

    @property
    def found(self) -> bool:
        """Whether the head and layer groups are found in the model rather than written in a preset."""
        return self.head is None or not self.layer_groups

    @property
    def group_names(self) -> tuple[str, ...]:
        """Every layer group, from the input to the head."""
        return (*(self.layer_groups or FOUND_GROUPS), HEAD_GROUP)

    def found_params(self) -> dict:
        """A run's params for the facts model=torchvision|timm finds (null in its config)."""
        facts = {"head": self.head, "aux_head": self.aux_head, "input_size": self.input_size}
        return {f"model.{k}": v for k, v in facts.items()} | {
            "model.mean": list(self.mean or ()),
            "model.std": list(self.std or ()),
        }


# The layer groups of a model without hand-written ones: its backbone's units split in three.
FOUND_GROUPS = ("early", "middle", "late")
SOURCES = ("torchvision", "timm")
HEAD_GROUP = "head"


@dataclass(frozen=True)
class Mode:
    """A transfer-learning mode (one conf/mode/*.yaml): where weights come from and what trains when."""

    name: str
    pretrained: bool
    trainable_from: str  # the earliest layer group that trains: the first one (all train) ... head
    freeze_norm_stats: bool  # norm layers of groups that do not train keep their statistics too
    freeze_epochs: int = 0  # staged: only the head trains for this many epochs first
    unfreeze_every: int = 0  # then 0: unfreeze down to trainable_from at once; N: one more group per N epochs

    @property
    def train_backbone(self) -> bool:
        """Whether anything below the head trains, in some epoch."""
        return self.trainable_from != HEAD_GROUP

    def trainable_groups(self, epoch: int, names: tuple[str, ...]) -> tuple[str, ...]:
        """The layer groups that train in `epoch` (1-based); `names` from the input to the head."""
        head, target = len(names) - 1, names.index(self.trainable_from)
        if epoch <= self.freeze_epochs:
            first = head
        elif self.unfreeze_every:  # the group below the head first, then one more each unfreeze_every
            first = max(target, head - 1 - (epoch - self.freeze_epochs - 1) // self.unfreeze_every)
        else:
            first = target
        return names[first:]


@dataclass(frozen=True)
class Job:
    """What Hydra knows of this run: where it was launched, where it writes, what was overridden."""

    launch_dir: Path
    output_dir: Path
    log_file: Path
    choices: Mapping[str, str]
    overrides: list[str]
    number: int | None  # the job's number in a multirun
    sweep_dir: Path | None  # a multirun's folder, where its sweep hand-off waits
    started: float  # time.monotonic() when its start-up began (recorder.startup_began)

    @classmethod
    def from_hydra(cls, started: float) -> Job:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra = HydraConfig.get()
        launch_dir, output_dir = Path(hydra.runtime.cwd), Path(hydra.runtime.output_dir)
        multirun = hydra.mode == RunMode.MULTIRUN
        return cls(
            launch_dir,
            output_dir,
            log_file=output_dir / f"{hydra.job.name}.log",
            choices=dict(hydra.runtime.choices),
            overrides=list(hydra.overrides.task),
            number=hydra.job.num if multirun else None,
            sweep_dir=launch_dir / hydra.sweep.dir if multirun else None,
            started=started,
        )

    @property
    def checkpoints(self) -> Path:
        """The folder this job's checkpoints go to (shared by a torchrun launch's restarts)."""
        return self.output_dir / "checkpoints"


def model_spec(model_cfg: DictConfig) -> ModelSpec:
    """The spec of the composed `model` group; `weights` is the user's choice, not a fact of it."""
    facts = OmegaConf.to_container(model_cfg, resolve=True)
    facts.pop("weights", None)
    facts["layer_groups"] = {name: tuple(paths) for name, paths in (facts.get("layer_groups") or {}).items()}
    for key in ("mean", "std"):
        facts[key] = None if facts.get(key) is None else tuple(facts[key])
    try:
        spec = ModelSpec(**facts)
    except TypeError as err:  # an unknown or missing key in a model YAML
        raise VisiontuneError(f"model={model_cfg.get('name')}: {err}") from err
    _check_found_facts(spec)
    if spec.aux_loss_weight and spec.aux_head is None:
        raise VisiontuneError(
            f"model.aux_loss_weight={spec.aux_loss_weight}: {spec.name} has no auxiliary head; "
            f"set model.aux_loss_weight=0"
        )
    return spec


def _check_found_facts(spec: ModelSpec) -> None:
    """The keys of model=torchvision|timm that a user gives: the library, the arch, the normalisation."""
    if spec.source not in SOURCES:
        raise VisiontuneError(f"model.source={spec.source} must be one of {', '.join(SOURCES)}")
    if not isinstance(spec.arch, str) or not spec.arch:
        raise VisiontuneError(
            f"model.arch={spec.arch!r} must name a {spec.source} model (visiontune-models lists them)"
        )
    for key in ("mean", "std"):
        value = getattr(spec, key)
        if value is not None and (len(value) != 3 or not all(isinstance(v, int | float) for v in value)):
            raise VisiontuneError(
                f"model.{key}={list(value)} must be 3 numbers, e.g. model.{key}=[0.5,0.5,0.5]"
            )
    if spec.std is not None and 0 in spec.std:
        raise VisiontuneError(f"model.std={list(spec.std)}: no value may be 0")


def mode_of(mode_cfg: DictConfig) -> Mode:
    return Mode(**OmegaConf.to_container(mode_cfg, resolve=True))


def model_names() -> list[str]:
    """The presets the package ships (conf/model/*.yaml but torchvision and timm, which build any
    model of their library): the architecture table's rows."""
    folder = resources.files("visiontune.conf") / "model"
    options = (p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))
    return sorted(name for name in options if name not in SOURCES)


DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")

# Keys added after runs were first recorded: a checkpoint written before a key existed lacks it,
# and the run resumes with the value it trained with. The one place, besides conf/, where a key's
# default is written.
EARLIER_DEFAULTS = {
    "data.gpu_augment": False,  # crops were drawn and rendered in the data workers
    "data.max_image_pixels": None,
    "backbone_batch_size": "auto",
    "compile": False,
    "optimizer.lr_decay": 1.0,
    "optimizer.decay_norm_and_bias": True,
    "scheduler.interval": "epoch",
    "mlflow.registered_model_name": None,
    "mlflow.champion_alias": "champion",
}


def _value(cfg: DictConfig, key: str):
    """cfg's value at `key`; for a key an earlier run's config lacks, the value it trained with."""
    value = OmegaConf.select(cfg, key, default=_ABSENT)
    if value is _ABSENT:
        return EARLIER_DEFAULTS[key]
    return value


_ABSENT = object()


@dataclass(frozen=True)
class DataSettings:
    """The `data` group: where the images are, how they are checked, cached and augmented."""

    root: str
    url: str | None
    md5: str | None
    tree_sha256: str | None
    skip_bad_images: bool
    max_image_pixels: int | None
    cache_mb: int
    gpu_augment: bool | str  # auto | true | false

    @property
    def cache_bytes(self) -> int:
        return self.cache_mb * 2**20


@dataclass(frozen=True)
class RuntimeSettings:
    """Where and how a run computes: device, precision, memory layout, workers, determinism."""

    device: str
    precision: str
    channels_last: bool | str
    num_workers: int | str
    deterministic: bool
    compile: bool
    backbone_batch_size: int | str  # images a frozen backbone takes at once in training, or auto


@dataclass(frozen=True)
class OptimSettings:
    """The optimiser and schedule: `optimizer` and `scheduler` stay mappings with a `_target_`
    (any torch class, instantiated by optim.py); the keys visiontune reads itself are fields."""

    optimizer: Mapping  # resolved, without lr, lr_decay and decay_norm_and_bias
    scheduler: Mapping | None  # resolved, without interval; None: scheduler=none
    lr: float  # the head's rate
    lr_decay: float  # each layer group below the head: its rate times this once more
    decay_norm_and_bias: bool
    per_batch: bool  # the schedule steps after every batch (scheduler.interval=batch)
    label_smoothing: float

    @property
    def optimizer_name(self) -> str:
        return self.optimizer["_target_"].rsplit(".", 1)[-1].lower()

    @property
    def scheduler_name(self) -> str:
        return self.scheduler["_target_"].rsplit(".", 1)[-1] if self.scheduler else "none"


@dataclass(frozen=True)
class CheckpointSettings:
    every_epochs: int  # 0: no checkpoints
    log_to_mlflow: bool
    keep_after_finish: bool


@dataclass(frozen=True)
class MlflowSettings:
    tracking_uri: str | None
    experiment_name: str
    log_model: bool
    registered_model_name: str | None
    champion_alias: str


@dataclass(frozen=True)
class Settings:
    """One run's whole config, read once and checked: what every step below run(cfg) is handed."""

    model: ModelSpec
    weights: str | None  # model.weights: the user's choice of starting weights, not a fact of the model
    mode: Mode
    data: DataSettings
    runtime: RuntimeSettings
    optim: OptimSettings
    checkpoint: CheckpointSettings
    mlflow: MlflowSettings
    epochs: int
    batch_size: int
    seed: int
    resume: str | None


def read(cfg: DictConfig) -> Settings:
    """The composed config as typed values, each checked; a value no training can use is refused
    naming the key, the value and the fix.

    Needs neither torch nor the store: a typo is answered at once and leaves no run behind.
    """
    for key, example in (("epochs", 15), ("batch_size", 8)):
        _check_number(key, OmegaConf.select(cfg, key), example, whole=True)
    spec, mode = model_spec(cfg.model), mode_of(cfg.mode)
    _check_model(spec, cfg.batch_size)
    _check_mode(mode, spec, cfg.epochs)
    weights = cfg.model.weights
    if mode.pretrained and weights is None:
        raise VisiontuneError(
            f"mode={mode.name} starts from pretrained weights but model.weights is null: "
            f"set model.weights=DEFAULT or a state-dict path, or use mode=scratch"
        )
    return Settings(
        model=spec,
        weights=None if weights is None else str(weights),
        mode=mode,
        data=_data_settings(cfg),
        runtime=_runtime_settings(cfg),
        optim=_optim_settings(cfg),
        checkpoint=_checkpoint_settings(cfg.checkpoint),
        mlflow=read_mlflow(cfg),
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        resume=None if cfg.resume is None else str(cfg.resume),
    )


def _check_model(spec: ModelSpec, batch_size: int) -> None:
    if spec.input_size is not None and spec.input_size < spec.min_input_size:
        raise VisiontuneError(
            f"model.input_size={spec.input_size} is too small for {spec.name}: it needs at least "
            f"{spec.min_input_size} px (model.input_size={spec.min_input_size})"
        )
    if batch_size < spec.min_batch_size:
        raise VisiontuneError(
            f"batch_size={batch_size} is too small for {spec.name}: batch norm in its training needs "
            f"at least {spec.min_batch_size} images per batch (batch_size={spec.min_batch_size} or more)"
        )


def _data_settings(cfg: DictConfig) -> DataSettings:
    gpu_augment = _value(cfg, "data.gpu_augment")
    if not (isinstance(gpu_augment, bool) or gpu_augment == "auto"):  # 1 == True: not a flag here
        raise VisiontuneError(
            f"data.gpu_augment={gpu_augment} must be auto (crops rendered on a CUDA device), "
            f"true (on any device) or false (in the data workers)"
        )
    data = cfg.data
    if OmegaConf.is_missing(data, "root"):  # conf/data/imagefolder.yaml: root: ???
        raise VisiontuneError(
            f"data.root is required for data={data.get('name', 'imagefolder')}: "
            f"data.root=/path/to/folder (with train/ and val/ inside)"
        )
    return DataSettings(
        root=str(data.root),
        url=data.url,
        md5=data.md5,
        tree_sha256=data.tree_sha256,
        skip_bad_images=data.skip_bad_images,
        max_image_pixels=_value(cfg, "data.max_image_pixels"),
        cache_mb=data.cache_mb,
        gpu_augment=gpu_augment,
    )


def _runtime_settings(cfg: DictConfig) -> RuntimeSettings:
    if cfg.num_workers != "auto" and (not isinstance(cfg.num_workers, int) or cfg.num_workers < 0):
        raise VisiontuneError(f"num_workers={cfg.num_workers} must be auto or a whole number, 0 or more")
    if str(cfg.precision) not in PRECISIONS:
        raise VisiontuneError(f"precision={cfg.precision} must be one of {', '.join(PRECISIONS)}")
    if cfg.channels_last not in (True, False, "auto"):
        raise VisiontuneError(f"channels_last={cfg.channels_last} must be auto, true or false")
    backbone = _value(cfg, "backbone_batch_size")
    if backbone != "auto" and (isinstance(backbone, bool) or not isinstance(backbone, int) or backbone < 1):
        raise VisiontuneError(
            f"backbone_batch_size={backbone} must be auto or a whole number of images, 1 or more "
            f"(it is rounded down to a multiple of batch_size={cfg.batch_size})"
        )
    for key in ("compile", "deterministic"):
        if _value(cfg, key) not in (True, False):
            raise VisiontuneError(f"{key}={_value(cfg, key)} must be true or false")
    if not DEVICE.fullmatch(str(cfg.device)):
        raise VisiontuneError(f"device={cfg.device} is not a device: use auto, cpu, cuda, cuda:N or mps")
    return RuntimeSettings(
        device=str(cfg.device),
        precision=str(cfg.precision),
        channels_last=cfg.channels_last,
        num_workers=cfg.num_workers,
        deterministic=cfg.deterministic,
        compile=_value(cfg, "compile"),
        backbone_batch_size=backbone,
    )


def _optim_settings(cfg: DictConfig) -> OptimSettings:
    _check_number("optimizer.lr", cfg.optimizer.lr, 0.001, whole=False)
    lr_decay = _value(cfg, "optimizer.lr_decay")
    _check_number("optimizer.lr_decay", lr_decay, 0.3, whole=False)
    smoothing = cfg.loss.label_smoothing
    if isinstance(smoothing, bool) or not isinstance(smoothing, int | float) or not 0 <= smoothing < 1:
        raise VisiontuneError(
            f"loss.label_smoothing={smoothing} must be a number from 0 up to (not including) 1, e.g. 0.1"
        )
    optimizer = OmegaConf.to_container(cfg.optimizer, resolve=True)
    for key in ("lr", "lr_decay", "decay_norm_and_bias"):
        optimizer.pop(key, None)
    scheduler = OmegaConf.to_container(cfg.scheduler, resolve=True) if cfg.scheduler else None
    if scheduler is not None:
        scheduler.pop("interval", None)
    return OptimSettings(
        optimizer=optimizer,
        scheduler=scheduler,
        lr=cfg.optimizer.lr,
        lr_decay=lr_decay,
        decay_norm_and_bias=_value(cfg, "optimizer.decay_norm_and_bias"),
        per_batch=bool(cfg.scheduler) and _value(cfg, "scheduler.interval") == "batch",
        label_smoothing=smoothing,
    )


def _checkpoint_settings(checkpoint: DictConfig) -> CheckpointSettings:
    every = checkpoint.every_epochs
    if not isinstance(every, int) or isinstance(every, bool) or every < 0:
        raise VisiontuneError(f"checkpoint.every_epochs={every} must be a whole number, 0 (none) or more")
    return CheckpointSettings(every, checkpoint.log_to_mlflow, checkpoint.keep_after_finish)


def read_mlflow(cfg: DictConfig) -> MlflowSettings:
    """The `mlflow` settings alone, checked: where a run is recorded, known before it starts."""
    name, alias = _value(cfg, "mlflow.registered_model_name"), _value(cfg, "mlflow.champion_alias")
    _check_registry(name, alias)
    return MlflowSettings(
        tracking_uri=cfg.mlflow.tracking_uri,
        experiment_name=typed_text(cfg, "mlflow.experiment_name"),
        log_model=cfg.mlflow.log_model,
        registered_model_name=name,
        champion_alias=alias,
    )


def typed_text(cfg: DictConfig, key: str) -> str | None:
    """cfg's value at `key` as text: where YAML read what the user typed as a number or a flag
    (2024, nan, true), the text itself, from Hydra's record of the overrides (not True)."""
    value = OmegaConf.select(cfg, key)
    if value is None or isinstance(value, str):
        return value
    for override in _task_overrides(cfg):
        name, _, text = override.partition("=")
        if name.lstrip("+~") == key and "," not in text:  # a sweep's list is no one value
            return text.strip("'\"")
    return str(value)


def _task_overrides(cfg: DictConfig) -> list[str]:
    """The command line's overrides: in the config a sweep callback gets, or from Hydra in a job."""
    if "hydra" in cfg:
        return list(OmegaConf.select(cfg, "hydra.overrides.task", default=[]))
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return []
    hydra = HydraConfig.get()
    # A sweep's job is handed Hydra's rendering of its values (true -> True); the sweep's own
    # record, written before any job starts, keeps the command line as typed.
    sweep = Path(hydra.runtime.cwd, hydra.sweep.dir, "multirun.yaml")
    if hydra.mode == RunMode.MULTIRUN and sweep.is_file():
        return list(OmegaConf.select(OmegaConf.load(sweep), "hydra.overrides.task", default=[]))
    return list(hydra.overrides.task)


# model.weights values that are no file: torchvision's weights names (DEFAULT, IMAGENET1K_V1, ...)
# and MLflow model URIs (models.resolve_weights tells them apart with torchvision at hand).
WEIGHTS_NAME = re.compile(r"[A-Z][A-Z0-9_]*")
MODEL_URI = re.compile(r"(runs|models):/")


def weights_file(weights: str | None, mode: Mode, launch_dir: Path) -> Path | None:
    """The file model.weights names, where it names one and the mode loads it; None otherwise."""
    if weights is None or not mode.pretrained or WEIGHTS_NAME.fullmatch(weights) or MODEL_URI.match(weights):
        return None
    return (launch_dir / weights).resolve()


def _check_mode(mode: Mode, spec: ModelSpec, epochs: int) -> None:
    if mode.trainable_from not in spec.group_names:
        raise VisiontuneError(
            f"mode.trainable_from={mode.trainable_from} is not a layer group of {spec.name}: "
            f"use one of {', '.join(spec.group_names)}"
            + ("" if spec.found else f" (conf/model/{spec.name}.yaml names them)")
        )
    for key in ("freeze_epochs", "unfreeze_every"):
        _check_number(f"mode.{key}", getattr(mode, key), 1, whole=True, zero=True)
    if mode.freeze_epochs and mode.train_backbone and mode.freeze_epochs >= epochs:
        raise VisiontuneError(
            f"mode.freeze_epochs={mode.freeze_epochs} leaves none of the epochs={epochs} to train the "
            f"unfrozen model: lower it or raise epochs (mode=feature_extract trains the head alone)"
        )


# MLflow's rules for aliases: "latest" and version-like names (v1, V12) are taken.
ALIAS = re.compile(r"(?!latest$)(?![vV]\d+$)[\w-]{1,255}")


def _check_registry(name, alias) -> None:
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise VisiontuneError(
            f"mlflow.registered_model_name={name!r} must be a model name, "
            "e.g. mlflow.registered_model_name=ants"
        )
    if name is not None and not (isinstance(alias, str) and ALIAS.fullmatch(alias)):
        raise VisiontuneError(
            f"mlflow.champion_alias={alias!r} is not an MLflow alias: letters, digits, _ and -, "
            "not 'latest' nor a version like v2 (e.g. mlflow.champion_alias=champion)"
        )


def _check_number(key: str, value, example, whole: bool, zero: bool = False) -> None:
    if isinstance(value, str):
        raise VisiontuneError(
            f"{key}={value!r} is a string (quoted on the command line?); it must be a number, "
            f"e.g. {key}={example}"
        )
    kind = "whole number" if whole else "number"
    valid = int if whole else int | float
    if not isinstance(value, valid) or isinstance(value, bool) or value < 0 or (value == 0 and not zero):
        sign = "0 or a positive" if zero else "a positive"
        raise VisiontuneError(f"{key}={value} must be {sign} {kind}, e.g. {key}={example}")


# --- the command line, before Hydra reads it ------------------------------------------------------

GROUPS = ("model", "mode", "data", "optimizer", "scheduler", "search")


def check_command_line(args: list[str]) -> None:
    """Override mistakes that Hydra answers with a parser error or with advice that misleads.

    Hydra meets `epoch=3` with "use +epoch=3", which adds a key nothing reads and trains the
    default 15 epochs; an unquoted `data.root` with a non-ASCII letter or `&` gets a lexer error.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    overrides = []
    for text in (a for a in args if "=" in a and not a.startswith("-")):
        try:
            overrides.extend(parser.parse_overrides([text]))
        except OverrideParseException:
            key, _, value = text.partition("=")
            raise VisiontuneError(
                f"{text}: Hydra cannot read this value unquoted (non-ASCII letters and characters such "
                f"as & ( ) need quotes). Quote it inside shell quotes: '{key}=\"{value}\"'"
            ) from None
    plain = [o for o in overrides if o.type == OverrideType.CHANGE and o.package is None]
    choices = {o.key_or_group: o for o in plain if o.key_or_group in GROUPS}
    known = _known_keys([f"{g}={_first_value(o)}" for g, o in choices.items()])
    if known is None:  # the groups themselves do not compose: Hydra's own message says why
        return
    for override in plain:
        key = override.key_or_group
        group = key.split(".")[0]
        if key in GROUPS or "/" in key or group == "hydra" or key in known:
            continue
        if group in choices and choices[group].is_sweep_override():  # keys differ per swept option
            continue
        leaf = key.rsplit(".", 1)[-1]  # lr -> optimizer.lr
        known = {k for k in known if not k.startswith("_") and "._" not in k}
        close = [k for k in sorted(known) if k.rsplit(".", 1)[-1] == leaf]
        close += [k for k in difflib.get_close_matches(key, known, n=3) if k not in close]
        hint = f"; did you mean {' or '.join(close)}?" if close else " (see: visiontune-train --cfg job)"
        raise VisiontuneError(f"unknown key {key}{hint}")


def _first_value(override) -> str:
    if not override.is_sweep_override():
        return str(override.value())
    return next(iter(override.sweep_string_iterator()), "") if override.is_discrete_sweep() else ""


def _known_keys(group_choices: list[str]) -> set[str] | None:
    """Every key (nodes and leaves) of the config composed with these group options."""
    from hydra import compose, initialize_config_module

    try:
        with initialize_config_module(config_module="visiontune.conf", version_base="1.3"):
            cfg = compose(config_name="train", overrides=group_choices)
    except Exception:
        return None
    container = OmegaConf.to_container(cfg, resolve=False)
    return set(_paths(container))


def _paths(tree: Mapping, prefix: str = ""):
    for key, value in tree.items():
        yield f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _paths(value, f"{prefix}{key}.")
