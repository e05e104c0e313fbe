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

from visiontune import VisiontuneError, is_fraction

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
    # The tutorial's crop and flip, nothing more: runs recorded before the augment group existed.
    "augment.name": "tutorial",
    "augment.magnitude": 9,
    "augment.num_ops": 2,
    "augment.random_erasing": 0.0,
    "augment.mixup_alpha": 0.0,
    "augment.cutmix_alpha": 0.0,
    "augment.mix_prob": 1.0,
    "data.val_fraction": 0.2,  # split folders only, before a run could be one folder split for it
    "data.test_fraction": 0.0,
    "data.folds": 0,
    "data.fold": 0,
    "data.split_seed": None,
    "data.sampler": "shuffle",
    "loss.class_weights": None,
    "predict.threshold": 0.5,
    "mlflow.champion_margin": 0.0,  # the alias moved to each sweep's best child, ungated
    "mlflow.champion_force": True,
    "ema.decay": None,
    "early_stopping.patience": 0,
    "early_stopping.min_delta": 0.0,
    "accumulate_batches": 1,
    "clip_grad_norm": None,
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
    # The splits a layout lacks, carved by data/splits.py; k-fold selection of the val split.
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    folds: int = 0
    fold: int = 0
    split_seed: int | None = None  # seeds the carved splits and folds; None: the run's seed
    sampler: str = "shuffle"  # shuffle | balanced (each class drawn equally often)
    tables: TableSettings | None = None  # data=csv: labels from CSV files instead of class folders
    threshold: float = 0.5  # predict.threshold: multi-label, a label is predicted at this probability or more

    @property
    def cache_bytes(self) -> int:
        return self.cache_mb * 2**20


POLICIES = ("tutorial", "trivialaugment", "randaugment", "autoaugment")
RANDAUGMENT_BINS = 31  # torchvision's num_magnitude_bins: augment.magnitude indexes them


@dataclass(frozen=True)
class AugmentSettings:
    """The `augment` group: the training split's per-image policy, random erasing, and the batch
    mixing (mixup / cutmix) the training loop applies on the device."""

    name: str  # tutorial | trivialaugment | randaugment | autoaugment: the policy after crop and flip
    magnitude: int  # randaugment: the bin (0 to 30) every op's strength is taken from
    num_ops: int  # randaugment: ops applied in a row
    random_erasing: float  # probability that a rectangle of each image is erased
    mixup_alpha: float  # Beta(alpha, alpha) of mixup's lambda; 0: off
    cutmix_alpha: float  # Beta(alpha, alpha) of cutmix's lambda; 0: off
    mix_prob: float  # share of batches mixed (by one of the two, at even odds where both are on)

    @property
    def mixes(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


def _augment_settings(cfg: DictConfig) -> AugmentSettings:
    values = {key: _value(cfg, f"augment.{key}") for key in AugmentSettings.__dataclass_fields__}
    if values["name"] not in POLICIES:
        raise VisiontuneError(f"augment.name={values['name']} must be one of {', '.join(POLICIES)}")
    _check_number("augment.num_ops", values["num_ops"], 2, whole=True, zero=True)
    _check_number("augment.magnitude", values["magnitude"], 9, whole=True, zero=True)
    if values["magnitude"] >= RANDAUGMENT_BINS:
        raise VisiontuneError(
            f"augment.magnitude={values['magnitude']} must be from 0 to {RANDAUGMENT_BINS - 1} "
            "(torchvision's magnitude bins), e.g. augment.magnitude=9"
        )
    for key, example in (("mixup_alpha", 0.2), ("cutmix_alpha", 1.0)):
        _check_number(f"augment.{key}", values[key], example, whole=False, zero=True)
    for key, example in (("random_erasing", 0.25), ("mix_prob", 1.0)):
        _check_number(f"augment.{key}", values[key], example, whole=False, zero=True)
        if values[key] > 1:
            raise VisiontuneError(f"augment.{key}={values[key]} is a probability: 0 to 1, e.g. {example}")
    return AugmentSettings(**values)


@dataclass(frozen=True)
class TableSettings:
    """data=csv: CSV files of image paths and labels (absolute paths, or as given on the command line)."""

    train_csv: str
    val_csv: str | None
    test_csv: str | None
    image_root: str  # image paths in the CSVs are relative to this (default: the training CSV's folder)
    path_column: str
    label_column: str
    label_delim: str | None  # "|": several labels per image (a multi-label run)


SAMPLERS = ("shuffle", "balanced")
CLASS_WEIGHTS = (None, "auto")


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
    class_weights: str | None = None  # auto: each class's loss weighted by its inverse frequency

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
class EmaSettings:
    """ema.decay: an exponential moving average of the weights, validated beside them each epoch."""

    decay: float | None = None  # None: no average kept

    @property
    def on(self) -> bool:
        return self.decay is not None


@dataclass(frozen=True)
class EarlyStopping:
    """early_stopping: stop once val accuracy has not risen by more than min_delta for `patience` epochs."""

    patience: int = 0  # 0: never stop early
    min_delta: float = 0.0


@dataclass(frozen=True)
class LoopSettings:
    """What the training loop does besides one optimiser step per batch."""

    ema: EmaSettings = field(default_factory=EmaSettings)
    early_stopping: EarlyStopping = field(default_factory=EarlyStopping)
    accumulate_batches: int = 1  # batches whose gradients add up to one optimiser step
    clip_grad_norm: float | None = None  # the gradients' largest total norm; None: not clipped


@dataclass(frozen=True)
class MlflowSettings:
    tracking_uri: str | None
    experiment_name: str
    log_model: bool
    registered_model_name: str | None
    champion_alias: str
    champion_margin: float = 0.0  # accuracy (0-1) a challenger must beat the champion by to take the alias
    champion_force: bool = False  # move the alias to the sweep's best child whatever the scores


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
    augment: AugmentSettings
    loop: LoopSettings = field(default_factory=LoopSettings)


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
    settings = Settings(
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
        augment=_augment_settings(cfg),
        loop=_loop_settings(cfg),
    )
    _check_mixing(settings)
    return settings


def _check_mixing(settings: Settings) -> None:
    """mixup and cutmix blend one class into another: a multi-label run's targets are no single class."""
    tables = settings.data.tables
    if settings.augment.mixes and tables is not None and tables.label_delim is not None:
        raise VisiontuneError(
            f"augment.mixup_alpha={settings.augment.mixup_alpha} / augment.cutmix_alpha="
            f"{settings.augment.cutmix_alpha} mix single-label batches; a multi-label run "
            f"(data.label_delim={tables.label_delim!r}) takes neither: set both to 0"
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
    tables = _table_settings(data)
    if tables is None and OmegaConf.is_missing(data, "root"):  # conf/data/imagefolder.yaml: root: ???
        raise VisiontuneError(
            f"data.root is required for data={data.get('name', 'imagefolder')}: "
            f"data.root=/path/to/folder (with train/ and val/ inside, or one folder per class)"
        )
    plan = [_value(cfg, f"data.{key}") for key in ("val_fraction", "test_fraction", "folds", "fold")]
    from visiontune.data.splits import check_plan  # torch-free, as this module

    check_plan(*plan)
    sampler = _sampler(cfg, tables)
    return DataSettings(
        root=str(data.root) if tables is None else str(tables.image_root),
        url=data.url,
        md5=data.md5,
        tree_sha256=data.tree_sha256,
        skip_bad_images=data.skip_bad_images,
        max_image_pixels=_value(cfg, "data.max_image_pixels"),
        cache_mb=data.cache_mb,
        gpu_augment=gpu_augment,
        **dict(zip(("val_fraction", "test_fraction", "folds", "fold"), plan, strict=True)),
        split_seed=_split_seed(cfg),
        sampler=sampler,
        tables=tables,
        threshold=_threshold(cfg),
    )


def _split_seed(cfg: DictConfig) -> int | None:
    seed = _value(cfg, "data.split_seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise VisiontuneError(
            f"data.split_seed={seed} must be null (the run's seed) or a whole number, e.g. 0"
        )
    return seed


def _sampler(cfg: DictConfig, tables: TableSettings | None) -> str:
    sampler = _value(cfg, "data.sampler")
    if sampler == "balanced" and tables is not None and tables.label_delim is not None:
        raise VisiontuneError(
            "data.sampler=balanced draws by class, and a multi-label image has several: use "
            "data.sampler=shuffle with data.label_delim (loss.class_weights=auto weighs rare labels)"
        )
    if sampler not in SAMPLERS:
        raise VisiontuneError(
            f"data.sampler={sampler} must be shuffle (each image once per epoch) or balanced (each class "
            f"drawn equally often)"
        )
    return sampler


def _threshold(cfg: DictConfig) -> float:
    threshold = _value(cfg, "predict.threshold")
    if not is_fraction(threshold) or threshold == 0:
        raise VisiontuneError(
            f"predict.threshold={threshold} must be a probability between 0 and 1, e.g. 0.5"
        )
    return float(threshold)


def _table_settings(data: DictConfig) -> TableSettings | None:
    """data=csv's keys (None for a folder of images): the training CSV is required."""
    if OmegaConf.select(data, "train_csv", default=_ABSENT) is _ABSENT and not OmegaConf.is_missing(
        data, "train_csv"
    ):  # not data=csv (`in` would answer False for data=csv's missing ??? too)
        return None
    if OmegaConf.is_missing(data, "train_csv") or data.train_csv is None:
        raise VisiontuneError(
            "data.train_csv is required for data=csv: data.train_csv=/path/to/train.csv (columns path,label)"
        )
    delim = data.label_delim
    if delim is not None and (not isinstance(delim, str) or not delim):
        raise VisiontuneError(f"data.label_delim={delim!r} must be null (one label) or a character, e.g. '|'")
    optional = {
        key: None if data[key] is None else str(data[key]) for key in ("val_csv", "test_csv", "image_root")
    }
    image_root = optional.pop("image_root") or str(Path(str(data.train_csv)).parent)
    return TableSettings(
        train_csv=str(data.train_csv),
        **optional,
        image_root=image_root,
        path_column=str(data.path_column),
        label_column=str(data.label_column),
        label_delim=delim,
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
    if not is_fraction(smoothing):
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
        class_weights=_class_weights(cfg),
    )


def _class_weights(cfg: DictConfig) -> str | None:
    weights = _value(cfg, "loss.class_weights")
    if weights not in CLASS_WEIGHTS:
        raise VisiontuneError(
            f"loss.class_weights={weights} must be null (every class alike) or auto (each class weighted "
            f"by its inverse frequency in the training split)"
        )
    return weights


def _loop_settings(cfg: DictConfig) -> LoopSettings:
    """ema, early_stopping, accumulate_batches and clip_grad_norm, checked."""
    decay = _value(cfg, "ema.decay")
    if decay is not None and not is_fraction(decay):
        raise VisiontuneError(
            f"ema.decay={decay} must be null (no average) or a number from 0 up to (not including) 1, "
            f"e.g. ema.decay=0.999 (0 or null: off)"
        )
    patience, min_delta = _value(cfg, "early_stopping.patience"), _value(cfg, "early_stopping.min_delta")
    _check_number("early_stopping.patience", patience, 5, whole=True, zero=True)
    _check_number("early_stopping.min_delta", min_delta, 0.01, whole=False, zero=True)
    accumulate, clip = _value(cfg, "accumulate_batches"), _value(cfg, "clip_grad_norm")
    _check_number("accumulate_batches", accumulate, 4, whole=True)
    if clip is not None:
        _check_number("clip_grad_norm", clip, 1.0, whole=False)
    return LoopSettings(
        ema=EmaSettings(decay or None),  # 0 keeps nothing of the past: no average at all
        early_stopping=EarlyStopping(patience, min_delta),
        accumulate_batches=accumulate,
        clip_grad_norm=clip,
    )


@dataclass(frozen=True)
class RangeTestSettings:
    """visiontune-lr-find's own keys (conf/lr_find.yaml): the exponential learning-rate range test."""

    start_lr: float
    end_lr: float
    steps: int
    smoothing: float  # the loss's exponential smoothing, as fastai's (0.98)
    diverge: float  # stop once the smoothed loss exceeds this many times its lowest


def range_test_settings(cfg: DictConfig) -> RangeTestSettings:
    """lr_find.* checked: a range from a rate up to a higher one, in 10 or more steps."""
    found = cfg.lr_find
    for key, example in (("start_lr", 1e-7), ("end_lr", 10), ("diverge", 4)):
        _check_number(f"lr_find.{key}", found[key], example, whole=False)
    _check_number("lr_find.steps", found.steps, 100, whole=True)
    if found.end_lr <= found.start_lr or found.steps < 10:
        raise VisiontuneError(
            f"lr_find: the range test needs end_lr > start_lr and 10 steps or more (it has start_lr="
            f"{found.start_lr}, end_lr={found.end_lr}, steps={found.steps}), e.g. lr_find.end_lr=10"
        )
    smoothing = found.smoothing
    if not is_fraction(smoothing):
        raise VisiontuneError(
            f"lr_find.smoothing={smoothing} must be from 0 up to (not including) 1, e.g. 0.98"
        )
    return RangeTestSettings(found.start_lr, found.end_lr, found.steps, smoothing, found.diverge)


def _checkpoint_settings(checkpoint: DictConfig) -> CheckpointSettings:
    every = checkpoint.every_epochs
    if not isinstance(every, int) or isinstance(every, bool) or every < 0:
        raise VisiontuneError(f"checkpoint.every_epochs={every} must be a whole number, 0 (none) or more")
    return CheckpointSettings(every, checkpoint.log_to_mlflow, checkpoint.keep_after_finish)


def read_mlflow(cfg: DictConfig) -> MlflowSettings:
    """The `mlflow` settings alone, checked: where a run is recorded, known before it starts."""
    name, alias = _value(cfg, "mlflow.registered_model_name"), _value(cfg, "mlflow.champion_alias")
    _check_registry(name, alias)
    margin, force = _value(cfg, "mlflow.champion_margin"), _value(cfg, "mlflow.champion_force")
    _check_number("mlflow.champion_margin", margin, 0.01, whole=False, zero=True)
    if not isinstance(force, bool):
        raise VisiontuneError(f"mlflow.champion_force={force!r} must be true or false")
    return MlflowSettings(
        tracking_uri=cfg.mlflow.tracking_uri,
        experiment_name=typed_text(cfg, "mlflow.experiment_name"),
        log_model=cfg.mlflow.log_model,
        registered_model_name=name,
        champion_alias=alias,
        champion_margin=float(margin),
        champion_force=force,
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

GROUPS = ("model", "mode", "data", "optimizer", "scheduler", "search", "augment", "recipe")


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
