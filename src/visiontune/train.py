"""The visiontune-train command, also `torchrun -m visiontune.train`: one-line errors, exit codes, fast help.

torch and mlflow are imported by the pipeline, not here, so that --help, --cfg and config
errors answer at once.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from visiontune import Stopped, Terminated, VisiontuneError, config, distributed, redact, user_message

log = logging.getLogger("visiontune")

# Options that live in optional Hydra plugins: (override, plugin module, what to install).
PLUGIN_OPTIONS = (
    *(
        (f"hydra/launcher={name}", "hydra_plugins.hydra_submitit_launcher", "visiontune[slurm]")
        # the plugin's two launchers, and visiontune's presets over them (conf/hydra/launcher)
        for name in ("submitit_slurm", "submitit_local", "slurm", "local")
    ),
    *(
        (f"hydra/launcher={name}", "hydra_plugins.hydra_ray_launcher", "visiontune[ray]")
        for name in ("ray", "ray_gpu")
    ),
)


@hydra.main(version_base="1.3", config_path="pkg://visiontune.conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Train one configuration; returns its best validation accuracy (for sweepers)."""
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    launch = distributed.Launch.from_env()
    rank = launch.rank if launch else 0
    _set_up_process(multirun, rank)
    _redact_saved_config(multirun)
    try:
        if not multirun:  # a bad value is refused before any run is recorded (a sweep's job records it)
            _check_values(cfg, rank)
        from visiontune import pipeline  # torch and mlflow: only once the config is known to be good

        return pipeline.run(cfg)
    except VisiontuneError as err:
        log.error("error: %s", user_message(err))
        if multirun:  # the sweep goes on; the job's MLflow run is already FAILED
            return None
        raise SystemExit(1) from None
    except Requeued as requeued:
        log.warning("requeued (preempted or out of time): the job continues this MLflow run when it restarts")
        raise SystemExit(requeued.code) from None  # the exit code submitit chose (local: "requeue me")
    except KeyboardInterrupt as err:
        _interrupted(err, launch, rank)
    except Exception:
        if not multirun:
            raise
        log.exception("job failed")
        return None


def _set_up_process(multirun: bool, rank: int) -> None:
    """Console prefixes for jobs and ranks that share a console, and how SIGTERM stops the run."""
    if multirun:  # jobs of a parallel sweep share one console
        _prefix_console(f"#{HydraConfig.get().job.num} ")
    if rank > 0:  # torchrun's ranks share one console too; rank 0 speaks for the run
        _prefix_console(f"[rank {rank}] ")
    if threading.current_thread() is threading.main_thread():
        if SUBMITIT_JOB in os.environ:
            _end_killed_on_requeue()
        else:
            signal.signal(signal.SIGTERM, _terminate)


def _redact_saved_config(multirun: bool) -> None:
    """Hydra saved the config and the overrides as typed (.hydra/*.yaml, a sweep's multirun.yaml)
    before this job started: a password in the tracking URI must not stay there in clear text."""
    hydra = HydraConfig.get()
    files = []
    if hydra.output_subdir is not None:
        files += Path(hydra.runtime.output_dir, hydra.output_subdir).glob("*.yaml")
    if multirun:
        files.append(Path(hydra.runtime.cwd, hydra.sweep.dir, "multirun.yaml"))
    for file in files:
        text = file.read_text() if file.is_file() else ""
        if (safe := redact(text)) != text:
            partial = file.with_name(f"{file.name}.{os.getpid()}.partial")
            partial.write_text(safe)
            os.replace(partial, file)  # parallel jobs rewrite a sweep's file alike, never half of it


def _interrupted(err: KeyboardInterrupt, launch: distributed.Launch | None, rank: int) -> NoReturn:
    """Ctrl-C (exit 130), SIGTERM (143) or a lost torchrun peer (1), said once."""
    if launch is not None and threading.current_thread() is threading.main_thread():
        # torchrun sends SIGTERM to the ranks left once one stops: it must not cut this exit short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if isinstance(err, Stopped):  # a run it had open already said "MLflow run ... KILLED"
        log.error("error: %s", err)
        raise SystemExit(1) from None
    stopped = isinstance(err, Terminated)
    if rank == 0:  # other ranks record no run
        log.error("%s: the MLflow run is marked KILLED", "terminated" if stopped else "interrupted")
    raise SystemExit(143 if stopped else 130) from None


def _check_values(cfg: DictConfig, rank: int) -> None:
    """config.read and the paths it names; under torchrun every rank finds the same mistake, and
    rank 0 alone says it."""
    try:
        settings = config.read(cfg)
        if settings.resume is None:  # a resumed run trains on its own config's paths
            _check_paths(settings, Path(HydraConfig.get().runtime.cwd))
    except VisiontuneError:
        if rank > 0:
            raise SystemExit(1) from None
        raise


def _check_paths(settings: config.Settings, launch_dir: Path) -> None:
    """The data folder's layout and the weights file, cheaply (no image opened, no torch): a wrong
    path is answered in a second, before a run exists. What needs torch is checked in the run."""
    from visiontune.data import sources  # its checks need no torch

    sources.check_source(settings.data, launch_dir)
    weights = config.weights_file(settings.weights, settings.mode, launch_dir)
    if weights is not None and not weights.is_file():
        raise VisiontuneError(
            f"model.weights={weights}: no such file. Pass a state-dict file saved from torchvision's "
            f"{settings.model.arch} (1000 classes), model.weights=DEFAULT for torchvision's ImageNet "
            f"weights, or mode=scratch."
        )


def _terminate(signum, frame) -> None:
    from visiontune import sweep

    sweep.note_interrupted()  # a sweep's job in this process: its parent ends KILLED, not FAILED
    raise Terminated


# Set by submitit in every process it starts for a job, on SLURM (submitit_slurm) or here (submitit_local).
SUBMITIT_JOB = "SUBMITIT_EXECUTOR"


class Requeued(KeyboardInterrupt):
    """submitit requeued this job (preemption, time-out) and ends its process: the run is KILLED, not
    FAILED, and the job's next start continues it (resume.decide)."""

    def __init__(self, code) -> None:
        super().__init__()
        self.code = code


def _end_killed_on_requeue() -> None:
    """Leave submitit's signal handlers in place, with its requeue ending the MLflow run KILLED.

    submitit ignores SIGTERM (SLURM sends it before a preemption's USR2, and a job that stopped then
    would never be requeued) and, on USR2, checkpoints and requeues the job, then exits through
    SystemExit, which a run would record as FAILED. Its exit code is kept: 144 makes
    submitit_local start the job again.
    """
    from submitit import JobEnvironment

    from visiontune import store

    number = getattr(signal, f"SIG{JobEnvironment.USR_SIG}")  # USR2 unless $SUBMITIT_PREEMPT_SIGNAL
    requeue = signal.getsignal(number)
    if not callable(requeue):
        return

    def requeued(signum, frame) -> None:
        try:
            requeue(signum, frame)
        except SystemExit as leaving:
            raise Requeued(leaving.code) from None

    signal.signal(number, requeued)
    store.hold_during_writes(number)  # never in the middle of a write to the store


def cli() -> None:
    """The console script: main(), after checking that options from optional plugins can load.

    Without the plugin Hydra only says it cannot find 'hydra/launcher/submitit_slurm'; this says what
    to install instead.
    """
    launch = distributed.Launch.from_env()
    args = sys.argv[1:]
    if launch is None:
        # Read by conf/train.yaml: runs launched in the same second still get folders of their own.
        os.environ["VISIONTUNE_LAUNCH_ID"] = str(os.getpid())
    for option, module, extra in PLUGIN_OPTIONS:
        if option in args and importlib.util.find_spec(module) is None:
            missing = f'{option} needs a Hydra plugin that is not installed: pip install "{extra}"'
            _stop(launch, f"error: {missing}")
    slurm = [o for o in ("hydra/launcher=slurm", "hydra/launcher=submitit_slurm") if o in args]
    if slurm and shutil.which("sbatch") is None:  # submitit would fail only after the parent run exists
        _stop(
            launch,
            f"error: {slurm[0]} submits each job with SLURM's sbatch, which this machine does not have: "
            f"launch from a login node of the cluster, or try the sweep here with hydra/launcher=local",
        )
    try:
        config.check_command_line(args)
        args = _expanded(args, launch)
    except VisiontuneError as err:
        _stop(launch, f"error: {user_message(err)}")
    multirun = bool({"-m", "--multirun"} & set(args))
    if multirun and launch is not None:
        _stop(launch, "error: -m/--multirun cannot run under torchrun: start the sweep without torchrun")
    if launch is not None:
        sys.argv += _torchrun_overrides(launch, args)
    if problem := _search_moved(args) or _unwritable_output(sys.argv[1:], multirun):
        _stop(launch, f"error: {problem}")
    if multirun:
        _sweep()
        return
    main()


# Hydra's Optuna sweeper (visiontune-train -m search=optuna) pinned optuna<3 and ran trials in
# batches, with no pruning and an in-memory study; visiontune-search drives Optuna >= 4 itself.
SEARCH_MOVED = (
    "searches run with visiontune-search, which takes the same overrides: visiontune-search search=basic "
    "--workers 2 --trials 20 ... (see docs/how-to/search.md)"
)


def _search_moved(args: list[str]) -> str | None:
    searched = [a for a in args if a.startswith(("search=", "hydra/sweeper=optuna"))]
    return f"{searched[0]}: {SEARCH_MOVED}" if searched else None


def _expanded(args: list[str], launch: distributed.Launch | None) -> list[str]:
    """repeats=N and data.folds=K as seed and fold axes of a sweep (sweep.expand_repeats), into
    sys.argv for Hydra; refused under torchrun, where a sweep cannot run."""
    from visiontune import sweep

    if PRINT_ONLY & set(args):  # --cfg job shows the first seed's config; Hydra allows no -m with it
        return args
    expanded = sweep.expand_repeats(args)
    if expanded != args:
        if launch is not None:
            raise VisiontuneError(
                "repeats= and data.folds= start a sweep, which cannot run under torchrun: start it without"
            )
        sys.argv[1:] = expanded
    return expanded


# Where Hydra puts run folders when the command line does not say (the part of conf/train.yaml's
# hydra.run.dir and hydra.sweep.dir before their ${now:...}).
OUTPUT_KEYS = {False: ("hydra.run.dir", "outputs/runs"), True: ("hydra.sweep.dir", "outputs/multirun")}
PRINT_ONLY = {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc"}


def _unwritable_output(args: list[str], multirun: bool) -> str | None:
    """Why Hydra could not write the run's folder, or None: Hydra itself answers with a traceback."""
    if PRINT_ONLY & set(args):  # --help, --cfg job: Hydra writes no folder
        return None
    key, default = OUTPUT_KEYS[multirun]
    given = [a.partition("=")[2].strip("'\"") for a in args if a.startswith(f"{key}=")]
    value = given[-1] if given else default
    existing = Path(value.split("${")[0] or ".").absolute()
    while not existing.exists():  # Hydra creates the rest below the nearest folder that exists
        existing = existing.parent
    fix = f"pass {key}=PATH with a folder you can write, or launch from one"
    if not existing.is_dir():
        return f"{key}={value}: {existing} is a file, not a folder: {fix}"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        return f"{key}={value}: cannot write in {existing} ({err.strerror or err}): {fix}"
    return None


def _stop(launch: distributed.Launch | None, message: str) -> None:
    """Exit 1 with `message`; under torchrun rank 0 alone prints it, not once per rank."""
    sys.exit(message if launch is None or launch.rank == 0 else 1)


def _torchrun_overrides(launch: distributed.Launch, args: list[str]) -> list[str]:
    """Hydra overrides for a torchrun worker: one output folder for all ranks, written by rank 0.

    ${now:...} resolves differently on each rank (hydra issue 2070), and every rank would write
    the same .hydra/ config and train.log (hydra issue 547). TORCHELASTIC_RUN_ID is the same on
    every rank and in every restart of the launch, so a restart finds its checkpoints there.
    """
    overrides = []
    if not any(arg.startswith("hydra.run.dir=") for arg in args):
        overrides.append(f"hydra.run.dir='outputs/runs/torchrun/{launch.run_id}'")
    if launch.rank > 0:  # no files, and only warnings on the console
        os.environ["TQDM_DISABLE"] = "1"
        overrides += [
            "hydra.output_subdir=null",
            "hydra.job_logging.root.handlers=[console]",
            "hydra.job_logging.root.level=WARNING",
        ]
    return overrides


WORKER_DIED = (
    "a worker process of the joblib launcher died (killed, or out of memory) and joblib stops the whole "
    "sweep: the jobs not FINISHED under its parent run did not run or were cut off; run the same "
    "command again (with a lower hydra.launcher.n_jobs if memory ran out)"
)


SUBMITIT_JOB_LOST = (
    "submitit job {job} ended without a result (killed, cancelled, out of memory, or out of time more "
    "often than hydra.launcher.max_num_timeout): Hydra's launcher stops waiting there, while the jobs "
    "still running go on and record their runs. When they have ended, run the same command with "
    "resume=last to train what is left"
)


def _sweep() -> None:
    """main() for a multirun, with a launcher's failure reported in one line.

    Hydra prints a traceback for an error a launcher raises; with HYDRA_FULL_ERROR it raises it
    instead, and what Hydra would have shown compactly is shown the same way here.
    """
    from concurrent.futures.process import BrokenProcessPool

    from hydra.errors import CompactHydraException

    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except CompactHydraException as err:
        cause = f"\n{err.__cause__}" if err.__cause__ is not None else ""
        sys.exit(f"{err}{cause}")
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM to the sweep's process (sweep.py)
        _sweep_stopped(err)
    except BrokenProcessPool:  # joblib's TerminatedWorkerError: one loky worker was killed
        from visiontune import sweep

        if not sweep.abandon_open_sweeps(WORKER_DIED):
            sys.exit(f"error: {WORKER_DIED}")
        sys.exit(1)
    except Exception as err:
        if not type(err).__module__.startswith("submitit."):  # UncompletedJobError, FailedJobError
            raise
        from visiontune import sweep

        job = re.match(r"Job (\S+)", str(err))
        reason = SUBMITIT_JOB_LOST.format(job=job.group(1) if job else "?")
        # Its siblings may still be training (on SLURM they are jobs of their own): their runs stay open.
        if not sweep.abandon_open_sweeps(reason, close_children=False):
            sys.exit(f"error: {reason}")
        sys.exit(1)


def _sweep_stopped(err: KeyboardInterrupt) -> NoReturn:
    """The sweep's parent KILLED with the command that continues it, joblib's workers ended (none
    lingers, holding its memory), and the exit code of the signal: 143 for SIGTERM, 130 for Ctrl-C."""
    from visiontune import sweep

    if "joblib" in sys.modules:  # the joblib launcher ran: its loky workers outlive an abort otherwise
        from joblib.externals.loky import get_reusable_executor

        get_reusable_executor().shutdown(wait=False, kill_workers=True)
    sweep.abandon_open_sweeps("the sweep was stopped")
    raise SystemExit(143 if isinstance(err, Terminated) else 130) from None


def _prefix_console(prefix: str) -> None:
    """Start every console line of this job with `prefix`, so parallel jobs' lines tell apart."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setFormatter(_Prefixed(prefix, handler.formatter))


class _Prefixed(logging.Formatter):
    def __init__(self, prefix: str, inner: logging.Formatter | None):
        super().__init__()
        self.prefix, self.inner = prefix, inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        return self.prefix + self.inner.format(record)


if __name__ == "__main__":
    cli()
