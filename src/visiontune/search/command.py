"""The visiontune-search command: an Optuna study over visiontune-train's config, in worker processes.

    visiontune-search search=basic --workers 2 --trials 30 model=resnet mode=finetune

The command checks the config, opens (or joins) the study in its storage and the study's MLflow
parent run, starts --workers worker processes (search/worker.py), and once every trial has ended
writes the leaderboard and Optuna's plots on the parent. The same command again continues a
stopped study; the same command on another machine, with shared --storage, joins it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from visiontune import Terminated, VisiontuneError, config, redact, user_message

log = logging.getLogger("visiontune")

DESCRIPTION = """Hyperparameter search with Optuna: each trial a child run of one MLflow parent run.
Takes visiontune-train's config groups and overrides, plus search=<name> (conf/search/*.yaml:
the space, the sampler, the pruner). Examples:
  visiontune-search search=basic --workers 2 --trials 30 model=resnet mode=finetune
  visiontune-search search=models --storage /shared/study.log     (on each machine, to share a study)
  visiontune-search search=basic --storage postgresql://user@host/optuna
The same command again continues a stopped study: finished trials are kept, a trial cut off
continues from its checkpoint."""


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="visiontune-search",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="visiontune-search search=<name> [--workers N] [--trials T] [--storage S] [overrides ...]",
    )
    parser.add_argument("--workers", type=int, default=1, help="worker processes on this machine (default 1)")
    parser.add_argument(
        "--trials", type=int, default=None, help="trials in the study (default: search.trials)"
    )
    parser.add_argument(
        "--storage",
        default=None,
        help="a journal file (on a shared filesystem to share the study) or a database URL "
        "(postgresql://, mysql://, sqlite:///); default: outputs/search/<study>/journal.log",
    )
    parser.add_argument(
        "--study", default=None, help="the study's name (default: from search= and the overrides)"
    )
    args, overrides = parser.parse_known_args(argv)
    flags = [o for o in overrides if o.startswith("-")]
    if flags:
        parser.error(
            f"unknown option {flags[0]}: give overrides as key=value (a search is a multirun already)"
        )
    if args.workers < 1:
        parser.error(f"--workers {args.workers}: give 1 or more")
    return args, overrides


def main() -> None:
    args, overrides = parse(sys.argv[1:])
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("VISIONTUNE_LAUNCH_ID", str(os.getpid()))
    try:
        sys.exit(run(args, overrides))
    except VisiontuneError as err:
        sys.exit(f"error: {user_message(err)}")


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    """The study from start (or where it stopped) to its summary; the exit code."""
    from visiontune.search import study, summary

    launch_dir = Path.cwd()
    cfg, settings = checked_config(overrides, args.trials, launch_dir)
    name = args.study or f"{settings.name}-{study_key(overrides)}"
    study_dir = launch_dir / "outputs" / "search" / name
    storage = args.storage or str(study_dir / "journal.log")
    uri = tracking(cfg, launch_dir)
    plan = study.Plan(storage, name, str(study_dir), list(overrides), uri)
    opened = study.open_study(plan)
    parent = open_parent(opened, plan, cfg, list(settings.space))
    command = resume_command()
    log.info("study %s in %s; MLflow parent run %s", name, redact(storage), parent.run_id)
    try:
        codes = run_workers(plan, settings, args.workers)
    except KeyboardInterrupt as err:
        print(f"stopped; continue the study with: {command}", file=sys.stderr)
        parent.end("KILLED", resume_command=command)
        return 143 if isinstance(err, Terminated) else 130
    with study.handing_out(plan):  # a trial whose worker was killed waits for the next command
        study.requeue_dead(opened)
    counts = study.Counts.of(opened)
    if counts.finished(settings.trials):
        print("\n" + summary.summarise(opened, parent))
        return report_failures(opened, codes)
    if counts.running:
        log.info(
            "%d trials still run in other processes: the last process to end writes the summary",
            counts.running,
        )
        return 0
    parent.end("KILLED", resume_command=command)
    print(
        f"error: the study stopped after {counts.done} of {settings.trials} trials; continue it with: "
        f"{command}",
        file=sys.stderr,
    )
    return 1


def checked_config(overrides: list[str], trials: int | None, launch_dir: Path):
    """The composed config, its values checked as visiontune-train checks them, and the search's."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException

    from visiontune import train
    from visiontune.search import space

    config.check_command_line(overrides)
    chosen = [o.partition("=")[2] for o in overrides if o.startswith("search=")]
    plain = [o for o in overrides if not o.startswith("hydra")]
    try:
        with initialize_config_module(config_module="visiontune.conf", version_base="1.3"):
            cfg = compose(config_name="train", overrides=plain)
    except HydraException as err:
        raise VisiontuneError(str(err).splitlines()[0]) from None
    settings = space.read(cfg, chosen[-1] if chosen else "", trials)
    checked = config.read(cfg)
    train._check_paths(checked, launch_dir)
    return cfg, settings


def study_key(overrides: list[str]) -> str:
    """What names a study by default: the overrides (the sampler's seed aside, which each machine
    may set apart), so that the same command continues the same study."""
    from visiontune import sweep

    return sweep.overrides_key([o for o in overrides if not o.startswith("search.seed=")])[:8]


def tracking(cfg, launch_dir: Path) -> str:
    from visiontune import store
    from visiontune.config import typed_text

    uri = store.tracking_uri(cfg.mlflow.tracking_uri, launch_dir)
    store.ensure_experiment(uri, typed_text(cfg, "mlflow.experiment_name"))
    return uri


def open_parent(opened, plan, cfg, varied: list[str]):
    """The study's MLflow parent run: reopened where the study names one, else started (once, under
    the study's lock); its id handed to the trials' jobs through the study folder."""
    from visiontune import store, sweep
    from visiontune.config import typed_text
    from visiontune.search import study

    experiment_id = store.ensure_experiment(plan.tracking_uri, typed_text(cfg, "mlflow.experiment_name"))
    with study.handing_out(plan):
        known = study.parent_run_id(opened)
        if known:
            parent = store.ParentRun.reopen(plan.tracking_uri, experiment_id, known, plan.study)
        else:
            opening = {
                store.tags.SWEEP: "parent",
                store.tags.SWEEP_VARIED: ",".join(varied),
                store.tags.SWEEP_OVERRIDES: store.shorten(
                    redact(" ".join(plan.overrides)), store.TAG_VALUE_LIMIT
                ),
                store.tags.SWEEP_DIR: plan.study_dir,
                store.tags.SWEEP_KEY: plan.study,
                store.tags.STUDY: plan.study,
            }
            parent = store.ParentRun.start(plan.tracking_uri, experiment_id, f"search-{plan.study}", opening)
            opened.set_user_attr(study.PARENT, parent.run_id)
    sweep.write_handoff(Path(plan.study_dir), parent.run_id, varied)
    return parent


def run_workers(plan, settings, workers: int) -> list[int]:
    """Start the workers and wait for them; SIGTERM (or Ctrl-C) stops them all, each trial re-queued."""
    from dataclasses import asdict, replace

    from visiontune.search.worker import PLAN_VARIABLE

    signal.signal(signal.SIGTERM, _terminate)
    started = []
    for index in range(workers):
        data = {"plan": asdict(replace(plan, worker=index)), "settings": settings.to_json()}
        env = os.environ | {PLAN_VARIABLE: json.dumps(data)}
        started.append(subprocess.Popen([sys.executable, "-m", "visiontune.search.worker"], env=env))
    try:
        return [process.wait() for process in started]
    except KeyboardInterrupt as err:
        stop(started, grace=0 if isinstance(err, Terminated) else 30)
        raise


def stop(started: list[subprocess.Popen], grace: float) -> None:
    """Each worker told to stop (its trial's run KILLED, its values queued again), then waited for.

    Ctrl-C in a terminal reached the workers too: they get `grace` seconds to stop on their own,
    a second signal in the middle of their clean-up would cut it short."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for process in started:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in started:
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()


def _terminate(signum, frame) -> None:
    raise Terminated


def resume_command() -> str:
    return " ".join(["visiontune-search", *(shlex.quote(redact(a)) for a in sys.argv[1:])])


def report_failures(opened, codes: list[int]) -> int:
    from optuna.trial import TrialState

    from visiontune.search.study import REQUEUED

    failed = [
        t.number for t in opened.get_trials(states=(TrialState.FAIL,)) if not t.user_attrs.get(REQUEUED)
    ]
    if failed:
        print(f"error: {len(failed)} trials failed: {', '.join(map(str, failed))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    main()
