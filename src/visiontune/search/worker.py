"""One worker of a search: asks the study for a trial, trains it as a sweep job, tells the result, again.

Each trial is one job of visiontune-train's own multirun path (train.main under Hydra's run_job):
a child run of the study's parent, its log and checkpoints in <study dir>/<trial number>, its
config checked and recorded as any sweep job's. A worker asks for its next trial as soon as it is
free. `python -m visiontune.search.worker` with the plan in $VISIONTUNE_SEARCH_PLAN.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

from visiontune import Terminated, store, sweep
from visiontune.search import space, study
from visiontune.search.space import SearchSettings
from visiontune.search.study import Plan

log = logging.getLogger("visiontune")
PLAN_VARIABLE = "VISIONTUNE_SEARCH_PLAN"


def main() -> None:
    """The worker process: its plan from the environment, SIGTERM as an interruption, trials until done."""
    signal.signal(signal.SIGTERM, _terminate)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    data = json.loads(os.environ[PLAN_VARIABLE])
    plan, settings = Plan(**data["plan"]), SearchSettings.from_json(data["settings"])
    try:
        work(plan, settings)
    except KeyboardInterrupt as err:
        raise SystemExit(143 if isinstance(err, Terminated) else 130) from None


def _terminate(signum, frame) -> None:
    raise Terminated


def work(plan: Plan, settings: SearchSettings) -> None:
    """Trials until the study has --trials of them; a trial stopped by a signal is queued again."""
    opened = study.open_study(plan, space.sampler(settings, plan.worker), space.pruner(settings))
    while (trial := study.next_trial(opened, plan, settings.trials)) is not None:
        try:
            run_trial(opened, trial, plan, settings)
        except (KeyboardInterrupt, SystemExit):
            for number in (signal.SIGTERM, signal.SIGINT):  # a second signal must not cut this short
                signal.signal(number, signal.SIG_IGN)
            log.warning("trial %d stopped: queued again, it continues from its checkpoint", trial.number)
            study.requeue(opened, trial)
            raise


@dataclass
class Reporter:
    """After each epoch: val accuracy to the trial, the worker's heartbeat, and whether to prune."""

    trial: object
    pruned: bool = False

    def __call__(self, report) -> bool:
        self.trial.report(report.val.acc, report.epoch)
        self.trial.set_user_attr(study.HEARTBEAT, time.time())
        self.pruned = self.trial.should_prune()
        if self.pruned:
            log.info(
                "trial %d pruned after epoch %d (val acc %.4f)",
                self.trial.number,
                report.epoch,
                report.val.acc,
            )
        return self.pruned


def run_trial(opened, trial, plan: Plan, settings: SearchSettings) -> None:
    """Sample, train the trial's job, tag its run, tell the study."""
    from optuna.trial import TrialState

    first = trial.user_attrs[study.FIRST]
    values = space.suggest(trial, settings.space)
    overrides = [*plan.overrides, *(settings.space[k].override(k, v) for k, v in values.items())]
    overrides.append(f"search.trial={first}")
    if first != trial.number:  # a trial whose worker died: its run continues (resume: its checkpoint)
        overrides.append("resume=last")
    # Not through logging: its console handler still carries the previous job's "#<number>" prefix.
    sampled = " ".join(overrides[len(plan.overrides) :])
    print(f"[{time.strftime('%H:%M:%S')}] trial {trial.number}: {sampled}", file=sys.stderr, flush=True)
    reporter = Reporter(trial)
    with heartbeat(trial):
        value = train_job(overrides, first, plan.study_dir, reporter)
    state = (
        TrialState.FAIL if value is None else TrialState.PRUNED if reporter.pruned else TrialState.COMPLETE
    )
    tag_run(opened, trial, plan, overrides, state.name)
    opened.tell(trial, value if state == TrialState.COMPLETE else None, state=state)


def train_job(overrides: list[str], number: int, study_dir: str, reporter: Reporter) -> float | None:
    """visiontune-train's job for these overrides, as Hydra's basic launcher would run it in a sweep
    (number: its job number and output subfolder); its best val acc, or None where it failed."""
    from hydra import initialize_config_module
    from hydra._internal.callbacks import Callbacks
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import JobStatus, run_job
    from hydra.types import HydraContext, RunMode
    from omegaconf import open_dict

    from visiontune import pipeline, train

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="visiontune.conf", version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        given = [*overrides, f"hydra.sweep.dir={study_dir}"]
        cfg = loader.load_configuration("train", given, run_mode=RunMode.MULTIRUN)
        with open_dict(cfg):
            cfg.hydra.job.id = cfg.hydra.job.num = number
            cfg.hydra.mode = RunMode.MULTIRUN  # a sweep's job: a child of the parent in the hand-off
        HydraConfig.instance().set_config(cfg)
        pipeline.EPOCH_LISTENERS.append(reporter)
        try:
            done = run_job(
                hydra_context=HydraContext(config_loader=loader, callbacks=Callbacks()),
                task_function=train.main.__wrapped__,
                config=cfg,
                job_dir_key="hydra.sweep.dir",
                job_subdir_key="hydra.sweep.subdir",
            )
        finally:
            pipeline.EPOCH_LISTENERS.remove(reporter)
    return done.return_value if done.status == JobStatus.COMPLETED else None


class heartbeat:
    """While a trial trains: its worker's heartbeat every HEARTBEAT_SECONDS, for other hosts to see."""

    def __init__(self, trial):
        self.trial, self.stop = trial, threading.Event()

    def __enter__(self):
        threading.Thread(target=self._beat, daemon=True).start()

    def __exit__(self, *exc):
        self.stop.set()

    def _beat(self) -> None:
        while not self.stop.wait(study.HEARTBEAT_SECONDS):
            try:
                self.trial.set_user_attr(study.HEARTBEAT, time.time())
            except Exception:  # the trial ended meanwhile
                return


def tag_run(opened, trial, plan: Plan, overrides: list[str], state: str) -> None:
    """The trial's MLflow run, found by its overrides under the parent: its trial number and state."""
    parent = study.parent_run_id(opened)
    client = store.open_store(plan.tracking_uri)
    run = store.child_for(client, parent, sweep.overrides_key(overrides)) if parent else None
    if run is None:  # it failed before its run was recorded
        return
    marks = {
        store.tags.TRIAL: str(trial.number),
        store.tags.TRIAL_STATE: state,
        store.tags.STUDY: opened.study_name,
    }
    for key, value in marks.items():
        client.set_tag(run.info.run_id, key, value)
    trial.set_user_attr(study.RUN_ID, run.info.run_id)


if __name__ == "__main__":
    sys.exit(main())
