"""What a run continues, decided in one place: `resume=`, a sweep's requeued job, a torchrun restart.

Rank 0 decides (it alone reads the store) and hands every rank the same small answer, a
`Continued`: the run to continue, the checkpoint folder to load, or a run that already FINISHED.
The config a continued run trains with is its checkpoint's, with the keys that may change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from visiontune import VisiontuneError, checkpoint, store, sweep
from visiontune.config import Job
from visiontune.store import tags

log = logging.getLogger("visiontune")

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
class Continued:
    """What this launch continues; the default, nothing: a new run from the start."""

    run_id: str | None = None  # the MLflow run to continue
    folder: Path | None = None  # its checkpoint folder; None: the run starts over from epoch 1
    finished_acc: float | None = None  # the run already FINISHED with this best val acc: nothing to train

    def saved(self) -> checkpoint.Saved | None:
        return checkpoint.read(self.folder) if self.folder else None


def decide(cfg: DictConfig, job: Job, restarted: bool, client, experiment_id: str) -> Continued:
    """What `resume=`, a requeued sweep job or a torchrun restart (`restarted`) continues."""
    if restarted:
        found = after_restart(job, client, experiment_id)
    else:
        found = _earlier(cfg, job, client, experiment_id)
    if found.finished_acc is not None:
        log.info("already FINISHED as MLflow run %s: not trained again", found.run_id)
    return found


def _earlier(cfg: DictConfig, job: Job, client, experiment_id: str) -> Continued:
    """A single run resumes what resume= names; a sweep's job, its own child of the reopened parent
    (resume=), or of its own sweep when the job starts again (requeued after a preemption or time-out)."""
    parent_id, _ = sweep.read_handoff(job.sweep_dir)
    if parent_id is None:
        if not cfg.resume:
            return Continued()
        saved = find(str(cfg.resume), client, experiment_id, cfg)
        return Continued(saved.run_id, saved.folder)
    if not cfg.resume and not started_before(job):
        return Continued()
    child = store.child_for(client, parent_id, sweep.overrides_key(job.overrides))
    if child is None:  # never started
        return Continued()
    if child.info.status == "FINISHED":
        return Continued(child.info.run_id, finished_acc=child.data.metrics.get("best_val_acc", 0.0))
    refuse_if_training(child, f"resume={cfg.resume}" if cfg.resume else "a requeued job")
    folder = Path(child.data.tags.get(tags.CHECKPOINT, "/nonexistent"))
    # Without a checkpoint: the same run, from its start.
    return Continued(child.info.run_id, folder if (folder / checkpoint.LAST).is_file() else None)


def started_before(job: Job) -> bool:
    """Whether this sweep job ran before, in this same sweep: requeued by SLURM (which counts its
    restarts), or started again by submitit_local (which says nothing, but the job's own output
    folder then holds its checkpoint). A job of a new sweep finds no child of its own either way."""
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    requeued = restarts.isdigit() and int(restarts) > 0
    return requeued or (job.checkpoints / checkpoint.LAST).is_file()


def after_restart(job: Job, client, experiment_id: str) -> Continued:
    """torchrun --max-restarts restarted the workers: continue the run this launch started, from
    the last checkpoint in its output folder (shared by every attempt: the folder is named by
    TORCHELASTIC_RUN_ID). A run killed before its first checkpoint starts over in the same run."""
    query = f"tags.`{tags.OUTPUT_DIR}` = '{job.output_dir}'"
    runs = client.search_runs([experiment_id], query, max_results=1)
    if not runs:  # killed before its run was recorded (or checkpoint.every_epochs=0)
        return Continued()
    run_id = runs[0].info.run_id
    if runs[0].info.status == "FINISHED":
        return Continued(run_id, finished_acc=runs[0].data.metrics.get("best_val_acc", 0.0))
    log.info("torchrun restarted the workers: continuing MLflow run %s", run_id)
    return Continued(run_id, job.checkpoints if (job.checkpoints / checkpoint.LAST).is_file() else None)


def find(value: str, client, experiment_id: str, cfg: DictConfig) -> checkpoint.Saved:
    """The checkpoint that `resume=<value>` names, of a run no live process is still writing."""
    from mlflow.exceptions import MlflowException

    saved = _named(value, client, experiment_id, cfg)
    try:
        run = client.get_run(saved.run_id)
    except MlflowException:
        raise VisiontuneError(
            f"resume={value}: the checkpoint in {saved.folder} belongs to run {saved.run_id}, which this "
            f"store does not hold; resume it with the store it was trained with (mlflow.tracking_uri=...)"
        ) from None
    refuse_if_training(run, f"resume={value}")
    return saved


def refuse_if_training(run, why: str) -> None:
    """Stop where a live process on this host still trains `run`: continued twice at once, it
    would log every epoch twice."""
    process = run.data.tags.get(tags.PROCESS)
    if run.info.status == "RUNNING" and store.process_state(process) == "alive":
        raise VisiontuneError(
            f"{why}: run {run.info.run_id} is still being trained by process {process}; "
            f"let it end or stop it first (a run continued twice at once would log every epoch twice)"
        )


def _alive(run) -> bool:
    return store.process_state(run.data.tags.get(tags.PROCESS)) == "alive"


def _named(value: str, client, experiment_id: str, cfg: DictConfig) -> checkpoint.Saved:
    """The checkpoint that `resume=<value>` names: a run id, a checkpoint file or folder, or last."""
    if value == "last":
        return _newest_interrupted(client, experiment_id, digest(flat_config(cfg)))
    if Path(value).exists():
        return checkpoint.read(Path(value))
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(value)
    except MlflowException:
        raise VisiontuneError(
            f"resume={value} is neither a run id in this store nor a checkpoint file or folder; "
            f"the KILLED run's {tags.RESUME_COMMAND} tag has the command, or use resume=last"
        ) from None
    if tags.CHECKPOINT not in run.data.tags:
        raise VisiontuneError(
            f"resume={value}: run {value} has no checkpoint to continue (stopped before its first "
            f"epoch ended, or checkpoint.every_epochs=0): start it again instead"
        )
    saved = checkpoint.read(Path(run.data.tags[tags.CHECKPOINT]))
    if saved.run_id != run.info.run_id:  # another run's checkpoint has taken the folder since
        raise VisiontuneError(
            f"resume={value}: the checkpoint in {saved.folder} is run {saved.run_id}'s now, not run "
            f"{value}'s: that run cannot be continued (resume={saved.run_id} continues the other)"
        )
    return saved


def _newest_interrupted(client, experiment_id: str, wanted: str) -> checkpoint.Saved:
    """The newest run with this config that stopped with a checkpoint and no live process."""
    query = f"tags.`{tags.CONFIG_DIGEST}` = '{wanted}' and attributes.status != 'FINISHED'"
    runs = client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"], max_results=50)
    live = [r for r in runs if r.info.status == "RUNNING" and _alive(r)]
    for run in runs:
        folder = Path(run.data.tags.get(tags.CHECKPOINT, "/nonexistent"))
        if not (run.info.status == "RUNNING" and _alive(run)) and (folder / checkpoint.LAST).is_file():
            return checkpoint.read(folder)
    if live:
        raise VisiontuneError(
            f"resume=last: the only run with this config that can be continued, {live[0].info.run_id}, "
            f"is still being trained by process {live[0].data.tags.get(tags.PROCESS)}; let it end first"
        )
    raise VisiontuneError(
        "resume=last: no interrupted run of this experiment has this config and a checkpoint; give the "
        "same overrides as the run to resume, or resume=<run id>"
    )


# --- the config a continued run trains with ---------------------------------------------------------


def resumed_config(saved: checkpoint.Saved, cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The saved run's config, with this command line's `epochs` (and keys that change no number).

    A key given now with a value that would change training is refused, naming it; so is a group
    chosen now (model=, optimizer=, ...) that is not the one the run trained with.
    """
    now = flat_config(cfg)
    given = {o.lstrip("+~").partition("=")[0] for o in overrides}
    clash = [k for k in differing_keys(saved.config, now) if k in given or k.split(".")[0] in given]
    if clash:
        raise VisiontuneError(
            f"resume: {', '.join(_named_by_command_line(clash, given))} differ from the run being resumed, "
            f"which would change its training; only epochs (and where it is recorded) may change. "
            f"Start a new run instead."
        )
    _refuse_stretching(saved, now, given)
    _refuse_foreign_targets(saved)
    resumed = OmegaConf.create(_nest(saved.config))
    for key in given:
        if _may_differ(key) and key in now:
            OmegaConf.update(resumed, key, OmegaConf.select(cfg, key), force_add=True)
    return resumed


def _named_by_command_line(keys: list[str], given: set[str]) -> list[str]:
    """The keys as the user named them: `optimizer` for a group they chose, else the key itself."""
    return sorted({k if k in given else k.split(".")[0] for k in keys})


def _refuse_stretching(saved: checkpoint.Saved, now: Mapping, given: set[str]) -> None:
    stretched = "epochs" in given and now.get("epochs") != saved.config.get("epochs")
    if stretched and saved.config.get("scheduler.interval") == "batch":
        raise VisiontuneError(
            f"resume: epochs={now.get('epochs')} would stretch the run's per-batch schedule "
            f"({saved.config.get('scheduler._target_')}), laid out for its {saved.config.get('epochs')} "
            f"epochs; resume without epochs=, or start a new run from its model "
            f"(model.weights=runs:/{saved.run_id}/model)"
        )


# What a checkpoint's config may instantiate: the optimisers and schedules of torch and visiontune.
# A checkpoint is a file anyone may hand over; its `_target_`s would otherwise run any callable
# (torch.load with weights_only=false, os.system...) when the run resumes.
ALLOWED_TARGETS = re.compile(r"torch\.optim\.(lr_scheduler\.)?[A-Z]\w*|visiontune\.optim\.[a-z_]+")


def _refuse_foreign_targets(saved: checkpoint.Saved) -> None:
    for key, value in saved.config.items():
        allowed = key in ("optimizer._target_", "scheduler._target_") and ALLOWED_TARGETS.fullmatch(
            str(value)
        )
        if key.rsplit(".", 1)[-1] == "_target_" and not allowed:
            raise VisiontuneError(
                f"resume: the checkpoint in {saved.folder} asks to instantiate {key}={value}, which is "
                f"not one of torch's or visiontune's optimisers and schedules: it is not resumed"
            )


def differing_keys(saved: Mapping, current: Mapping) -> list[str]:
    """Flattened config keys whose values differ, leaving out those that may (MAY_DIFFER)."""
    keys = saved.keys() | current.keys()
    changed = [k for k in keys if saved.get(k, "<absent>") != current.get(k, "<absent>")]
    return sorted(k for k in changed if not _may_differ(k))


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


def _nest(flat: Mapping) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree
