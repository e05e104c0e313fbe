"""The `search` config group read once: the space (a distribution per key), the sampler, the pruner.

Every check of a search's settings happens here, before any process starts; optuna is imported
only where a worker builds its sampler, pruner and suggestions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

from omegaconf import DictConfig, OmegaConf

from visiontune import VisiontuneError, config

SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "hyperband", "none")
KINDS = ("float", "int", "categorical")
EXAMPLE = "{type: float, low: 1e-5, high: 1e-1, log: true} or {type: categorical, choices: [4, 8]}"


@dataclass(frozen=True)
class Distribution:
    """One key's distribution: float or int between low and high (log scale or not), or a choice."""

    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple | None = None

    def override(self, key: str, value) -> str:
        """The Hydra override that sets `key` to a sampled value (floats exactly, by repr)."""
        return f"{key}={value!r}" if isinstance(value, float) else f"{key}={value}"

    def example(self):
        return self.choices[0] if self.type == "categorical" else self.low


@dataclass(frozen=True)
class SearchSettings:
    name: str  # the search=<name> option
    trials: int
    sampler: str
    seed: int | None
    pruner: str
    startup_trials: int
    warmup_epochs: int
    epochs: int  # each trial's epochs: hyperband's largest budget
    space: Mapping[str, Distribution]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> SearchSettings:
        space = {k: Distribution(**{**v, "choices": _tuple(v["choices"])}) for k, v in data["space"].items()}
        return cls(**{**data, "space": space})


def _tuple(choices):
    return None if choices is None else tuple(choices)


def read(cfg: DictConfig, name: str, trials: int | None) -> SearchSettings:
    """The composed config's `search` node (search=`name`), checked; --trials wins over search.trials."""
    search = cfg.get("search")
    if not search or "space" not in search:
        raise VisiontuneError(
            f"visiontune-search needs a search space: give search=<name>, one of {', '.join(options())} "
            f"(conf/search/*.yaml)"
        )
    _one_of("search.sampler", search.sampler, SAMPLERS)
    _one_of("search.pruner", search.pruner, PRUNERS)
    total = trials if trials is not None else search.trials
    _whole("trials", total, 1)
    for key in ("startup_trials", "warmup_epochs"):
        _whole(f"search.{key}", search[key], 0)
    if search.seed is not None:
        _whole("search.seed", search.seed, 0)
    space = {key: distribution(key, value) for key, value in _flat(search.space).items()}
    if not space:
        raise VisiontuneError(f"search.space is empty: give at least one key, e.g. optimizer.lr={EXAMPLE}")
    config.check_command_line([d.override(k, d.example()) for k, d in space.items()])
    return SearchSettings(
        *(name, total, search.sampler, search.seed, search.pruner),
        *(search.startup_trials, search.warmup_epochs, int(cfg.epochs), space),
    )


def options() -> list[str]:
    """The search spaces the package ships: conf/search/*.yaml."""
    from importlib import resources

    folder = resources.files("visiontune.conf") / "search"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def _whole(key: str, value, least: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise VisiontuneError(
            f"{key}={value} must be a whole number of at least {least}, e.g. {key}={least + 2}"
        )


def _flat(tree, prefix: str = "") -> dict:
    """key -> distribution spec; `+search.space.optimizer.momentum={...}` nests, a YAML key may hold dots."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, DictConfig | dict) and "type" not in value and value:
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _one_of(key: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise VisiontuneError(f"{key}={value} is not one of {', '.join(allowed)}: e.g. {key}={allowed[0]}")


def distribution(key: str, value) -> Distribution:
    """search.space.<key>, checked: its type and the bounds or the choices that type needs."""
    spec = OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value
    where = f"search.space.{key}"
    if not isinstance(spec, dict) or spec.get("type") not in KINDS:
        raise VisiontuneError(f"{where}={spec}: give a mapping with type {'|'.join(KINDS)}, e.g. {EXAMPLE}")
    unknown = set(spec) - {"type", "low", "high", "log", "choices", "step"}
    if unknown:
        raise VisiontuneError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; e.g. {EXAMPLE}")
    if spec["type"] == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise VisiontuneError(f"{where}: a categorical key needs a list of choices, e.g. choices: [4, 8]")
        return Distribution("categorical", choices=tuple(choices))
    low, high, log = spec.get("low"), spec.get("high"), bool(spec.get("log", False))
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (low, high))
    if not numbers or low >= high or (log and low <= 0):
        raise VisiontuneError(
            f"{where}: low={low} and high={high} must be numbers with low < high (and low > 0 for "
            f"log: true), e.g. {EXAMPLE}"
        )
    if spec["type"] == "int" and not all(isinstance(v, int) for v in (low, high)):
        raise VisiontuneError(f"{where}: an int key needs whole low and high, e.g. low: 2, high: 8")
    return Distribution(spec["type"], low=low, high=high, log=log)


# --- what a worker builds from the settings (optuna imported here) ---------------------------------


def suggest(trial, space: Mapping[str, Distribution]) -> dict:
    """The trial's value for each key (a re-queued trial gets back the values it had)."""
    values = {}
    for key, d in space.items():
        if d.type == "categorical":
            values[key] = trial.suggest_categorical(key, list(d.choices))
        elif d.type == "int":
            values[key] = trial.suggest_int(key, int(d.low), int(d.high), log=d.log)
        else:
            values[key] = trial.suggest_float(key, float(d.low), float(d.high), log=d.log)
    return values


def sampler(settings: SearchSettings, worker: int):
    import optuna

    seed = None if settings.seed is None else settings.seed + worker
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(settings.startup_trials, 1))


def pruner(settings: SearchSettings):
    import optuna

    if settings.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=settings.startup_trials, n_warmup_steps=settings.warmup_epochs
        )
    if settings.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(settings.epochs, 1))
    return optuna.pruners.NopPruner()
