"""The Optuna study in its shared storage: opened alike by every process, trials handed out one at a time.

Any process on any machine that opens the same storage joins the study. A trial left RUNNING by a
process that died (killed on this host, or silent past STALE_SECONDS anywhere) goes back into the
queue with the values it had, and its MLflow run continues from its checkpoint.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from visiontune import store

log = logging.getLogger("visiontune")

# Trial user attributes (Optuna's own, visible in its dashboard and trials table).
PROCESS = "visiontune.process"  # host:pid@start of the worker training it
HEARTBEAT = "visiontune.heartbeat"  # when that worker last said it is alive (unix time)
FIRST = "visiontune.trial"  # the number of the trial it continues (its own for a new trial)
REQUEUED = "visiontune.requeued"  # on a trial that died: its values went back into the queue
RUN_ID = "mlflow.run_id"  # its MLflow run
PARENT = "mlflow.parent_run_id"  # a study user attribute: the study's MLflow parent run

HEARTBEAT_SECONDS = 30
STALE_SECONDS = 300  # a trial on another host, silent this long, died with its worker


@dataclass(frozen=True)
class Plan:
    """What every worker of a command needs: where the study is and what each trial overrides."""

    storage: str  # a journal file's path or an RDB URL
    study: str
    study_dir: str  # each trial's Hydra output goes to <study_dir>/<first trial number>
    overrides: list[str]  # the command's visiontune-train overrides, search=<name> included
    tracking_uri: str  # the MLflow store of the parent and the trials' runs
    worker: int = 0


def storage(spec: str):
    """A journal file (path) or a database (URL with ://) as an Optuna storage."""
    if "://" in spec:
        return spec
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    Path(spec).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(spec))


def open_study(plan: Plan, sampler=None, pruner=None):
    """The study, created by the first process that asks (maximising the best val accuracy)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # visiontune says what each trial does
    return optuna.create_study(
        storage=storage(plan.storage),
        study_name=plan.study,
        direction="maximize",
        sampler=sampler,
        pruner=pruner,
        load_if_exists=True,
    )


@contextlib.contextmanager
def handing_out(plan: Plan) -> Iterator[None]:
    """One process at a time counts the trials and asks for the next (a lock beside a journal file,
    else in the study folder): N workers never start more than --trials trials between them."""
    folder = Path(plan.storage).parent if "://" not in plan.storage else Path(plan.study_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f".{plan.study}.lock", "a") as file:
        fcntl.lockf(file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(file, fcntl.LOCK_UN)


@dataclass(frozen=True)
class Counts:
    done: int  # COMPLETE, PRUNED, and FAIL that was not re-queued
    running: int
    waiting: int  # re-queued values, waiting for a worker

    @classmethod
    def of(cls, study) -> Counts:
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False)
        ended = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        done = [t for t in trials if t.state in ended and not t.user_attrs.get(REQUEUED)]
        states = [t.state for t in trials]
        return cls(len(done), states.count(TrialState.RUNNING), states.count(TrialState.WAITING))

    def finished(self, trials: int) -> bool:
        return self.done >= trials and not self.running and not self.waiting


def next_trial(study, plan: Plan, trials: int):
    """The next trial for this worker (a re-queued one first), or None once --trials are handed out."""
    with handing_out(plan):
        requeue_dead(study)
        counts = Counts.of(study)
        if not counts.waiting and counts.done + counts.running >= trials:
            return None
        trial = study.ask()
        first = trial.user_attrs.get(FIRST, trial.number)
        beat = {PROCESS: store.this_process(), HEARTBEAT: time.time(), FIRST: first}
        for key, value in beat.items():
            trial.set_user_attr(key, value)
        return trial


def requeue_dead(study) -> None:
    """Trials whose worker died: failed, their values queued again for the next free worker."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        state = store.process_state(trial.user_attrs.get(PROCESS))
        silent = time.time() - trial.user_attrs.get(HEARTBEAT, time.time())
        if state == "dead" or (state == "unknown" and silent > STALE_SECONDS):
            log.warning("trial %d: its worker died; its values go back into the queue", trial.number)
            requeue(study, trial)


def requeue(study, trial) -> None:
    """Fail `trial` (a FrozenTrial or Trial) and queue its values again, under its first number."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    trial_id = trial._trial_id
    first = study._storage.get_trial(trial_id).user_attrs.get(FIRST, trial.number)
    try:
        study._storage.set_trial_user_attr(trial_id, REQUEUED, True)
        study._storage.set_trial_state_values(trial_id, TrialState.FAIL)
    except UpdateFinishedTrialError:  # its worker told the result after all
        return
    study.enqueue_trial(dict(trial.params), user_attrs={FIRST: first}, skip_if_exists=False)


def parent_run_id(study) -> str | None:
    return study.user_attrs.get(PARENT)
