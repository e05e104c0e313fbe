"""Checkpoint files: what a run needs to continue exactly where it stopped, written atomically.

`last.pt` after every epoch (model, optimizer, scheduler, scaler, the weights' moving average,
progress with its early-stopping count, every random state, the epoch's metrics, the run id and
config); `best.pt` only when an epoch improves, so the best weights are not rewritten every epoch.
Each file is written beside its name, then renamed.
Which checkpoint a run continues from is resume.py's decision.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from visiontune import Stopped, VisiontuneError, engine, user_message

LAST, BEST = "last.pt", "best.pt"


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
    # A resumed attempt writes a folder of its own: its first checkpoint carries the best weights
    # over, even when the best epoch came before the interruption.
    if progress.best_epoch == progress.epoch or not (folder / BEST).is_file():
        _write(folder / BEST, progress.best_state)
    state = {
        "model": training.model.module.state_dict(),
        "optimizer": training.optimizer.state_dict(),
        "scheduler": training.scheduler.state_dict() if training.scheduler else None,
        "scaler": training.scaler.state_dict(),
        "ema": training.ema.state_dict() if training.ema is not None else None,
        "progress": {
            "epoch": progress.epoch,
            "best_acc": progress.best_acc,
            "best_epoch": progress.best_epoch,
            "curve": list(progress.curve),
            "best_from": progress.best_from,
            "watched": progress.watched,
            "waited": progress.waited,
        },
        "rng": _random_states(),
        **extra,
    }
    _write(folder / LAST, state)


class NotWritten(Stopped):
    """A checkpoint could not be written (a full disk, a folder gone): the run stops KILLED, and
    resumes from the checkpoint before it once the cause is fixed."""


def _write(path: Path, state) -> None:
    partial = path.with_name(path.name + ".partial")
    try:
        torch.save(state, partial)
        os.replace(partial, path)  # a reader sees the old file or the new one, never half of one
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
        partial.unlink(missing_ok=True)  # half a file only keeps the disk full
        raise NotWritten(
            f"could not write the checkpoint {path} ({user_message(err)}); the run stops and can be "
            f"resumed from its previous checkpoint once there is room"
        ) from err


def read(folder: Path) -> Saved:
    """The checkpoint in `folder` (or the folder of a last.pt path), checked to be whole."""
    folder = folder.parent if folder.name == LAST else folder
    path = folder / LAST
    if not path.is_file():
        raise VisiontuneError(
            f"no checkpoint at {path}: the run wrote none (checkpoint.every_epochs=0), or it FINISHED "
            f"and its checkpoint was removed (checkpoint.keep_after_finish=true keeps it)"
        )
    if path.stat().st_size == 0:  # torch.load's own message for it is empty: "cannot be read ()"
        raise VisiontuneError(
            f"the checkpoint {path} is empty (0 bytes): it was truncated (a full disk, or a copy cut "
            f"short). Restore it from a copy, or start a new run"
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
    if training.ema is not None:
        training.ema.load_state_dict(saved.state["ema"])
    _set_random_states(saved.state["rng"])
    best = saved.folder / BEST
    best_state = torch.load(best, map_location="cpu", weights_only=True) if best.is_file() else None
    return engine.Progress(**saved.state["progress"], best_state=best_state)


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


def remove(folder: Path) -> None:
    """Delete the files a run wrote in `folder`, and the folder if that leaves it empty: never
    anything else a user (or another run sharing the folder) keeps there."""
    for name in (LAST, BEST):
        for path in (folder / name, folder / (name + ".partial")):
            path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # absent, or holding files that are not this run's
        folder.rmdir()
