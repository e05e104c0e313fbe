"""Checkpoints: what a run needs to continue exactly where it stopped, written atomically.

`last.pt` after every epoch (model, optimizer, scheduler, scaler, progress, every random state,
the epoch's metrics, the run id and config); `best.pt` only when an epoch improves, so the best
weights are not rewritten every epoch. Each file is written beside its name, then renamed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from visiontune import VisiontuneError, engine, store

LAST, BEST = "last.pt", "best.pt"
# Keys that may change on resume: how long it trains, and what does not change the numbers
# (where the run is recorded, how many processes decode, how many images a frozen backbone
# takes at once; results do not depend on the latter).
MAY_DIFFER = (
    "epochs",
    "resume",
    "checkpoint.",
    "mlflow.",
    "num_workers",
    "data.cache_mb",
    "backbone_batch_size",
)


@dataclass(frozen=True)
class Saved:
    """A checkpoint read back: its folder and its contents."""

    folder: Path
    state: dict

    @property
    def run_id(self) -> str:
        return self.state["run_id"]

    @property
    def config(self) -> dict:
        return self.state["config"]


def save(folder: Path, training: engine.Training, progress: engine.Progress, extra: Mapping) -> None:
    """last.pt for this epoch (and best.pt when it improved); `extra` holds run id, config, metrics."""
    folder.mkdir(parents=True, exist_ok=True)
    if progress.best_epoch == progress.epoch:
        _write(folder / BEST, progress.best_state)
    state = {
        "model": training.model.module.state_dict(),
        "optimizer": training.optimizer.state_dict(),
        "scheduler": training.scheduler.state_dict() if training.scheduler else None,
        "scaler": training.scaler.state_dict(),
        "progress": {
            "epoch": progress.epoch,
            "best_acc": progress.best_acc,
            "best_epoch": progress.best_epoch,
            "curve": list(progress.curve),
        },
        "rng": _random_states(),
        **extra,
    }
    _write(folder / LAST, state)


def _write(path: Path, state) -> None:
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)  # a reader sees the old file or the new one, never half of one


def read(folder: Path) -> Saved:
    """The checkpoint in `folder` (or the folder of a last.pt path), checked to be whole."""
    folder = folder.parent if folder.name == LAST else folder
    path = folder / LAST
    if not path.is_file():
        raise VisiontuneError(
            f"no checkpoint at {path}: the run wrote none (checkpoint.every_epochs=0), or it FINISHED "
            f"and its checkpoint was removed (checkpoint.keep_after_finish=true keeps it)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise VisiontuneError(f"the checkpoint {path} cannot be read ({err}): it is damaged") from err
    return Saved(folder, state)


def restore(saved: Saved, training: engine.Training) -> engine.Progress:
    """Put the saved states into `training` and every random generator; the progress to go on from."""
    training.model.module.load_state_dict(saved.state["model"])
    training.optimizer.load_state_dict(saved.state["optimizer"])
    if training.scheduler is not None and saved.state["scheduler"] is not None:
        training.scheduler.load_state_dict(saved.state["scheduler"])
    training.scaler.load_state_dict(saved.state["scaler"])
    _set_random_states(saved.state["rng"])
    best = saved.folder / BEST
    best_state = torch.load(best, map_location="cpu", weights_only=True) if best.is_file() else None
    return engine.Progress(**saved.state["progress"], best_state=best_state)


def differing_keys(saved: Mapping, current: Mapping) -> list[str]:
    """Flattened config keys whose values differ, leaving out those that may (MAY_DIFFER)."""
    keys = saved.keys() | current.keys()
    changed = [k for k in keys if saved.get(k, "<absent>") != current.get(k, "<absent>")]
    return sorted(k for k in changed if not any(k == m or k.startswith(m) for m in MAY_DIFFER))


def _random_states() -> dict:
    name, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        # As tensors and plain numbers: the file then loads with torch.load(weights_only=True).
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
        "python": random.getstate(),
    }


def _set_random_states(states: Mapping) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    name, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))


# --- finding the checkpoint to resume -------------------------------------------------------------

# old names, for pipeline.py until it reads store.tags
FOLDER_TAG = store.tags.CHECKPOINT
DIGEST_TAG = store.tags.CONFIG_DIGEST
RESUME_TAG = store.tags.RESUME_COMMAND


def flat_config(cfg: DictConfig) -> dict:
    """The config as key -> value, unresolved (`${epochs}` stays a reference), `_target_` included."""
    return dict(_flat(OmegaConf.to_container(cfg, resolve=False)))


def _flat(tree: Mapping, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            yield from _flat(value, f"{prefix}{key}.")
        else:  # a leaf, or an empty group (scheduler: none) that must come back as one
            yield f"{prefix}{key}", value


def digest(flat: Mapping) -> str:
    """A short fingerprint of everything that shapes training (MAY_DIFFER left out)."""
    kept = {k: v for k, v in flat.items() if not _may_differ(k)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _may_differ(key: str) -> bool:
    return any(key == m or key.startswith(m) for m in MAY_DIFFER)


def find(value: str, client, experiment_id: str, cfg: DictConfig) -> Saved:
    """The checkpoint that `resume=<value>` names, of a run no live process is still writing."""
    saved = _find(value, client, experiment_id, cfg)
    refuse_if_training(client.get_run(saved.run_id), f"resume={value}")
    return saved


def refuse_if_training(run, why: str) -> None:
    """Stop where a live process on this host still trains `run`: continued twice at once, it
    would log every epoch twice."""
    process = run.data.tags.get(store.tags.PROCESS)
    if run.info.status == "RUNNING" and store.process_state(process) == "alive":
        raise VisiontuneError(
            f"{why}: run {run.info.run_id} is still being trained by process {process}; "
            f"let it end or stop it first (a run continued twice at once would log every epoch twice)"
        )


def _find(value: str, client, experiment_id: str, cfg: DictConfig) -> Saved:
    """The checkpoint that `resume=<value>` names: a run id, a checkpoint file or folder, or last."""
    if value == "last":
        return _newest_interrupted(client, experiment_id, digest(flat_config(cfg)))
    if Path(value).exists():
        return read(Path(value))
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(value)
    except MlflowException:
        raise VisiontuneError(
            f"resume={value} is neither a run id in this store nor a checkpoint file or folder; "
            f"the KILLED run's {store.tags.RESUME_COMMAND} tag has the command, or use resume=last"
        ) from None
    if store.tags.CHECKPOINT not in run.data.tags:
        raise VisiontuneError(f"resume={value}: run {value} recorded no checkpoint, so it cannot be resumed")
    return read(Path(run.data.tags[store.tags.CHECKPOINT]))


def _newest_interrupted(client, experiment_id: str, wanted: str) -> Saved:
    query = f"tags.`{store.tags.CONFIG_DIGEST}` = '{wanted}' and attributes.status != 'FINISHED'"
    runs = client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise VisiontuneError(
            "resume=last: no interrupted run of this experiment has this config; give the same "
            "overrides as the run to resume, or resume=<run id>"
        )
    return read(Path(runs[0].data.tags[store.tags.CHECKPOINT]))


def resumed_config(saved: Saved, cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The saved run's config, with this command line's `epochs` (and keys that change no number).

    A key given now with a value that would change training is refused, naming it.
    """
    now = flat_config(cfg)
    given = {o.lstrip("+~").partition("=")[0] for o in overrides}
    clash = [k for k in differing_keys(saved.config, now) if k in given]
    if clash:
        raise VisiontuneError(
            f"resume: {', '.join(clash)} differ from the run being resumed, which would change its "
            f"training; only epochs (and where it is recorded) may change. Start a new run instead."
        )
    stretched = "epochs" in given and now.get("epochs") != saved.config.get("epochs")
    if stretched and saved.config.get("scheduler.interval") == "batch":
        raise VisiontuneError(
            f"resume: epochs={now.get('epochs')} would stretch the run's per-batch schedule "
            f"({saved.config.get('scheduler._target_')}), laid out for its {saved.config.get('epochs')} "
            f"epochs; resume without epochs=, or start a new run from its model "
            f"(model.weights=runs:/{saved.run_id}/model)"
        )
    resumed = OmegaConf.create(_nest(saved.config))
    for key in given:
        if _may_differ(key) and key in now:
            OmegaConf.update(resumed, key, OmegaConf.select(cfg, key), force_add=True)
    return resumed


def _nest(flat: Mapping) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree
