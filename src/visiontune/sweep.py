"""A Hydra callback that makes each multirun one MLflow parent run with its jobs as children.

The parent opens before any job starts, which also creates the store and the experiment once
(parallel joblib workers never race on a new SQLite file). Its id goes into the sweep folder,
where every job, in this process or a worker process, reads it. When the multirun ends the
parent gets the sweep's leaderboard and accuracy overlay.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import shlex
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, NoReturn

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("visiontune")

# A multirun's parent run id and the keys it varies, written once into the sweep folder before
# any job starts, so that jobs in this process and in joblib's worker processes all find them.
SWEEP_FILE = ".mlflow_sweep.json"


def overrides_key(overrides) -> str:
    """What identifies a sweep, or one of its jobs, across re-runs: its overrides, `resume=` aside."""
    kept = sorted(o for o in overrides if not o.startswith("resume="))
    return hashlib.sha256("\n".join(kept).encode()).hexdigest()[:16]


def write_handoff(sweep_dir: Path, parent_run_id: str, varied: list[str]) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / SWEEP_FILE).write_text(json.dumps({"parent_run_id": parent_run_id, "varied": varied}))


def read_handoff(sweep_dir: Path | None) -> tuple[str | None, list[str]]:
    """(parent run id, varied keys); (None, []) for a single run, or where no sweep callback ran."""
    path = sweep_dir / SWEEP_FILE if sweep_dir else None
    if path is None or not path.is_file():
        return None, []
    sweep = json.loads(path.read_text())
    return sweep["parent_run_id"], sweep["varied"]


def swept_keys(task_overrides, sweeper_params=None) -> list[str]:
    """The keys a multirun varies: model=resnet,vgg and lr=range(...) count, epochs=1 does not.

    `sweeper_params` is hydra.sweeper.params, where search spaces such as search=optuna's live.
    """
    parser = OverridesParser.create()
    given = parser.parse_overrides(list(task_overrides))
    searched = parser.parse_overrides([f"{key}={value}" for key, value in (sweeper_params or {}).items()])
    fixed = {o.get_key_element() for o in given if not o.is_sweep_override()}  # batch_size=16 wins
    keys = (o.get_key_element() for o in [*searched, *given] if o.is_sweep_override())
    return list(dict.fromkeys(key for key in keys if key not in fixed))


def expand_repeats(args: list[str]) -> list[str]:
    """The command line with repeats=N and data.folds=K as sweep axes: seed=S,S+1,...,S+N-1 and
    data.fold=0,...,K-1 (and -m, if missing). Each seed and fold is then an ordinary job and child
    run, and the parent's leaderboard groups them back into configurations (report.configurations).

    A line that already lists those very values (a resumed sweep's command) is left as it is.
    """
    from visiontune import VisiontuneError

    repeats = _count(args, "repeats", least=1)
    folds = _count(args, "data.folds", least=0)  # 0 or 1: no cross-validation
    expanded = list(args)
    if repeats > 1:
        first = _given(args, "seed")
        # seed=42,43,44 (a resumed sweep's command) starts at its first value; _with_axis checks the rest
        if first is None or "(" in first:  # seed=range(...) is refused by _with_axis
            base = _default_seed()
        else:
            base = _whole(first.split(",")[0], "seed", "seed=42")
        expanded = _with_axis(expanded, "seed", range(base, base + repeats), "repeats")
    if folds > 1 and not _single(args, "data.fold"):  # data.fold=2 alone: that one fold
        expanded = _with_axis(expanded, "data.fold", range(folds), "data.folds")
    if expanded == args:
        return args
    sweepers = [a for a in args if a.startswith(("search=", "hydra/sweeper=")) and not a.endswith("=null")]
    if sweepers:
        raise VisiontuneError(
            f"repeats= and data.folds= add seeds and folds to a Hydra sweep, which {sweepers[0]}'s "
            f"sampler would read as choices: leave them out of a search, or list seeds with the "
            f"basic sweeper (-m seed=1,2,3)"
        )
    return expanded if {"-m", "--multirun"} & set(expanded) else ["-m", *expanded]


def _given(args: list[str], key: str) -> str | None:
    """The value of the last `key=...` on the command line (None: not given)."""
    values = [a.partition("=")[2] for a in args if a.partition("=")[0] == key]
    return values[-1] if values else None


def _whole(text: str, key: str, example: str) -> int:
    from visiontune import VisiontuneError

    try:
        return int(text)
    except ValueError:
        raise VisiontuneError(f"{key}={text} must be a whole number, e.g. {example}") from None


def _count(args: list[str], key: str, least: int) -> int:
    from visiontune import VisiontuneError

    given = _given(args, key)
    count = 1 if given is None else _whole(given, key, f"{key}=3")
    if count < least:
        raise VisiontuneError(f"{key}={count} must be {least} or more, e.g. {key}=3")
    return count


def _single(args: list[str], key: str) -> bool:
    given = _given(args, key)
    return given is not None and "," not in given and "(" not in given


def _with_axis(args: list[str], key: str, values: range, cause: str) -> list[str]:
    """args with `key` swept over `values`, beside the `cause=` that asks for it (Hydra's options,
    such as --cfg job, may follow the overrides); a sweep of `key` already there must list those values."""
    from visiontune import VisiontuneError

    at = max(i for i, a in enumerate(args) if a.partition("=")[0] == cause) + 1
    why = args[at - 1]
    listed = ",".join(str(v) for v in values)
    given = _given(args, key)
    if given is not None and ("," in given or "(" in given):
        if given.replace(" ", "") == listed:  # the resume command of a sweep that expanded them
            return args
        raise VisiontuneError(
            f"{why} sweeps {key} over {listed}, but the command line also sweeps {key}={given}: "
            f"give one of them"
        )
    kept = [a for a in args[:at] if a.partition("=")[0] != key]
    return [*kept, f"{key}={listed}", *(a for a in args[at:] if a.partition("=")[0] != key)]


def _default_seed() -> int:
    """conf/train.yaml's seed: the first of the repeats when the command line sets none."""
    from importlib import resources

    from omegaconf import OmegaConf

    return int(OmegaConf.load(resources.files("visiontune.conf") / "train.yaml").seed)


def check_sweeper(sweeper: DictConfig) -> None:
    """Settings of an optimising sweeper (search=optuna) that cannot work with visiontune's jobs."""
    from omegaconf import ListConfig

    from visiontune import VisiontuneError

    direction = sweeper.get("direction")
    if direction is not None:
        directions = list(direction) if isinstance(direction, ListConfig | list) else [direction]
        names = [getattr(d, "name", str(d)).lower() for d in directions]  # enum or string
        if names != ["maximize"]:
            raise VisiontuneError(
                f"hydra.sweeper.direction={','.join(names)} would search for the lowest val accuracy; "
                f"each job returns its best val accuracy, so set hydra.sweeper.direction=maximize "
                f"(search=optuna does)"
            )
    if sweeper.get("storage"):
        # Hydra's Optuna sweeper supports optuna 2.x only, whose database storage predates
        # SQLAlchemy 2 (which MLflow needs); it fails with a bare AssertionError.
        raise VisiontuneError(
            f"hydra.sweeper.storage={sweeper.storage}: the Optuna 2.x that Hydra's sweeper supports "
            f"cannot use a database next to MLflow's SQLAlchemy 2; leave it unset (the study lives in "
            f"memory and every trial is kept in MLflow)"
        )


# Sweeps of this process whose parent run is open: the CLI ends them when the launcher itself fails.
_OPEN: list[MlflowSweep] = []


def abandon_open_sweeps(reason: str, close_children: bool = True) -> bool:
    """End every open sweep's parent FAILED with `reason`, one line each; whether there was one.

    `close_children=False` leaves its children RUNNING: jobs that still run elsewhere end their own.
    """
    ended = bool(_OPEN)
    for callback in list(_OPEN):
        callback._end_abandoned(reason, close_children)
    return ended


def note_interrupted() -> None:
    """A job of an open sweep in this process was stopped by SIGTERM: its parent ends KILLED."""
    for callback in _OPEN:
        callback.interrupted = True


class MlflowSweep(Callback):
    def __init__(self) -> None:
        self.parent = None  # a store.ParentRun while the sweep is open
        self.interrupted = False
        self.overrides: list[str] = []
        self.launch_dir = Path()
        self.gate = None  # a champion.Gate: the registered name and alias the winner may take

    # Hydra turns an exception in a callback into a warning and carries on: a sweep would run
    # with no parent, or end with exit 0 after its summary failed. Each hook therefore reports
    # its own failure and exits 1 (SystemExit passes through Hydra).
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from visiontune import VisiontuneError

        try:
            self._open_parent(config)
        except VisiontuneError as err:
            _fail(_message(err))
        except Exception as err:
            _fail(f"cannot start the sweep's MLflow parent run: {_message(err)}")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            failed, total = self._summarise()
        except Exception as err:
            self._end_abandoned(f"the sweep's summary could not be written ({_message(err)})")
            raise SystemExit(1) from None
        if failed:
            # print, not log: after the jobs, logging is configured by whichever job ran last.
            _fail(f"{len(failed)} of {total} jobs failed: {', '.join(failed)}")

    def _open_parent(self, config: DictConfig) -> None:
        from visiontune import redact, store
        from visiontune.config import typed_text

        check_sweeper(config.hydra.sweeper)
        check_ray(config.hydra.launcher, _has_nvidia_gpus())
        launch_dir = Path(config.hydra.runtime.cwd)
        uri = store.tracking_uri(config.mlflow.tracking_uri, launch_dir)
        experiment_id = store.ensure_experiment(uri, typed_text(config, "mlflow.experiment_name"))
        sweep_dir = launch_dir / str(config.hydra.sweep.dir)
        overrides = list(config.hydra.overrides.task)
        varied = swept_keys(overrides, config.hydra.sweeper.get("params"))
        # A sweep stopped by Ctrl-C or by its sweeper failing (Optuna, when no trial completed)
        # never reaches on_multirun_end; the parent then ends KILLED or FAILED at exit.
        self._end_on_stops()
        self.overrides, self.launch_dir = overrides, launch_dir
        key = overrides_key(overrides)
        self.gate = champion_gate(config)
        if config.get("resume"):  # the stopped sweep's parent; its jobs find their own children
            self.parent = store.ParentRun.reopen(uri, experiment_id, str(config.resume), key)
        else:
            opening = {
                store.tags.SWEEP: "parent",
                store.tags.SWEEP_VARIED: ",".join(varied),
                store.tags.SWEEP_OVERRIDES: store.shorten(redact(" ".join(overrides)), store.TAG_VALUE_LIMIT),
                store.tags.SWEEP_DIR: str(sweep_dir),
                store.tags.SWEEP_KEY: key,
            }
            name = f"sweep-{'-'.join(varied) or 'jobs'}-{sweep_dir.name}"
            self.parent = store.ParentRun.start(uri, experiment_id, name, opening)
        _OPEN.append(self)
        write_handoff(sweep_dir, self.parent.run_id, varied)
        log.info(
            "MLflow parent run %s for this sweep (varies %s)", self.parent.run_id, ", ".join(varied) or "-"
        )
        for note in launcher_notes(config.hydra.launcher, launch_dir, sweep_dir):
            log.info("%s", note)

    def _summarise(self) -> tuple[list[str], int]:
        """Leaderboard, figure and best child on the parent, which ends FINISHED; (failed jobs, jobs)."""
        from visiontune import report, store

        self.parent.close_orphans("FAILED")
        client = store.open_store(self.parent.uri)
        children = report.select_runs(client, parent=self.parent.run_id)
        with tempfile.TemporaryDirectory() as tmp:
            rows = report.write_report(client, children, Path(tmp))
            summary, metrics = _summary(rows)
            if self.gate and store.tags.BEST_CHILD_RUN_ID in summary:
                summary |= self._crown(client, summary[store.tags.BEST_CHILD_RUN_ID])
            self.parent.record(Path(tmp), summary, metrics)
            print("\n" + (Path(tmp) / "leaderboard.md").read_text())
        self.parent.end("FINISHED")
        self._closed()
        failed = [r["run"] for r in rows if r["status"] != "FINISHED"]
        return failed, len(rows)

    def _crown(self, client, run_id: str) -> dict[str, str]:
        """Register the best child's model; the champion gate decides whether the alias moves to it.
        The parent's tags saying what it decided. A gate that cannot score leaves the alias alone."""
        from mlflow.exceptions import MlflowException

        from visiontune import VisiontuneError, champion, store

        gate, launch_dir = self.gate, Path(self.launch_dir)
        data_root = launch_dir / client.get_run(run_id).data.params.get("data.root", "")
        try:
            verdict = champion.crown(self.parent.uri, run_id, gate, data_root)
        except (VisiontuneError, MlflowException, OSError) as err:
            print(f"error: the champion gate could not score run {run_id}'s model: {_message(err)}")
            return {store.tags.CHAMPION_GATE: f"failed: {_message(err)}"}
        where = f"models:/{gate.name}@{gate.alias}"
        print(f"registered run {run_id}'s model as {gate.name} version {verdict.version}: {verdict.decision}")
        print(where + (" now names it" if verdict.moved else f" stays version {verdict.champion}"))
        return {store.tags.CHAMPION_GATE: verdict.decision} | (
            {store.tags.CHAMPION: where} if verdict.moved else {}
        )

    def _resume_command(self) -> str:
        from visiontune import redact

        kept = [shlex.quote(redact(o)) for o in self.overrides if not o.startswith("resume=")]
        return " ".join(["visiontune-train", "-m", *kept, f"resume={self.parent.run_id}"])

    def _closed(self) -> None:
        self.parent = None
        if self in _OPEN:
            _OPEN.remove(self)

    def _end_on_stops(self) -> None:
        """The parent ends KILLED on Ctrl-C and SIGTERM, FAILED on any other early exit."""
        atexit.register(self._end_abandoned)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._note_interrupt)
            # SLURM, Kubernetes and `timeout` send SIGTERM to the whole process group: the sweep
            # stops as on Ctrl-C (joblib then ends its workers) instead of dying with its parent open.
            signal.signal(signal.SIGTERM, self._note_terminate)

    def _note_interrupt(self, signum, frame) -> None:
        self.interrupted = True
        signal.default_int_handler(signum, frame)  # raises KeyboardInterrupt, as without us

    def _note_terminate(self, signum, frame) -> None:
        from visiontune import Terminated

        self.interrupted = True
        raise Terminated

    def _end_abandoned(
        self, reason: str = "the sweep stopped before its end", close_children: bool = True
    ) -> None:
        """End a parent (and children) left RUNNING: KILLED after Ctrl-C, else FAILED. Never raises."""
        if self.parent is None:
            return
        status = "KILLED" if self.interrupted else "FAILED"
        try:
            if close_children:
                self.parent.close_orphans(status)
            if status == "FAILED":
                print(
                    f"error: {reason}; its MLflow parent run {self.parent.run_id} is FAILED", file=sys.stderr
                )
                self.parent.end(status, reason)
            else:
                command = self._resume_command()
                print(f"stopped; continue the sweep with: {command}", file=sys.stderr)
                self.parent.end(status, resume_command=command)
            self._closed()
        except Exception as err:
            print(f"error: cannot end the sweep's MLflow parent run: {_message(err)}", file=sys.stderr)


def champion_gate(config: DictConfig):
    """The gate a sweep's best child passes to take the registry alias; None when nothing registers."""
    from visiontune import champion
    from visiontune import config as settings

    mlflow = settings.read_mlflow(config)
    if not (mlflow.registered_model_name and mlflow.log_model):
        return None
    return champion.Gate(
        mlflow.registered_model_name, mlflow.champion_alias, mlflow.champion_margin, mlflow.champion_force
    )


def launcher_notes(launcher: DictConfig, launch_dir: Path, sweep_dir: Path) -> list[str]:
    """What a sweep under Hydra's submitit launcher should say before its jobs start: where their
    output goes (not to this console), and GPUs that submitit_local would hide from them."""
    target = str(launcher.get("_target_", ""))
    if "hydra_ray_launcher" in target:
        return _ray_notes(launcher)
    if "hydra_submitit_launcher" not in target:
        return []
    folder = launch_dir / str(launcher.submitit_folder).replace("%j", "<job id>")
    notes = [
        f"each job's console goes to {folder}/<job id>_0_log.err, its log to {sweep_dir}/<job number>/"
        f"train.log; this console shows the leaderboard when all have ended"
    ]
    if target.endswith("LocalLauncher") and not launcher.get("gpus_per_node") and _has_nvidia_gpus():
        notes.append(
            "submitit_local hides this machine's GPUs from its jobs, which train on the CPU: add "
            "hydra.launcher.gpus_per_node=1 (hydra/launcher=local does)"
        )
    return notes


def _ray_gpus(launcher: DictConfig) -> tuple[bool, float]:
    """(whether Ray starts on this machine, the GPUs each job asks for) of a Ray launcher's config."""
    ray = launcher.get("ray") or {}
    local = (ray.get("init") or {}).get("address") is None
    return local, float((ray.get("remote") or {}).get("num_gpus") or 0)


def check_ray(launcher: DictConfig, has_gpus: bool) -> None:
    """Jobs that ask a Ray started here for GPUs it does not have wait forever: refused first."""
    from visiontune import VisiontuneError

    if "hydra_ray_launcher" not in str(launcher.get("_target_", "")):
        return
    local, gpus = _ray_gpus(launcher)
    if local and gpus and not has_gpus:
        raise VisiontuneError(
            f"hydra.launcher.ray.remote.num_gpus={gpus:g}: each job asks Ray for a GPU and this machine has "
            f"none, so no job would ever start: add hydra.launcher.ray.remote.num_gpus=0 (they train on "
            f"the CPU), or join a Ray cluster with GPUs (hydra.launcher.ray.init.address=auto)"
        )


def _ray_notes(launcher: DictConfig) -> list[str]:
    local, gpus = _ray_gpus(launcher)
    if local and not gpus and _has_nvidia_gpus():
        # Ray hides every GPU from a task that asked for none (CUDA_VISIBLE_DEVICES is emptied).
        return [
            "Ray gives its jobs none of this machine's GPUs unless they ask: add "
            "hydra.launcher.ray.remote.num_gpus=1 (hydra/launcher=ray_gpu does)"
        ]
    return []


def _has_nvidia_gpus() -> bool:
    gpus = Path("/proc/driver/nvidia/gpus")  # the driver lists them whatever CUDA_VISIBLE_DEVICES says
    return gpus.is_dir() and any(gpus.iterdir())


def _summary(rows: list[dict]) -> tuple[dict[str, str], dict[str, float]]:
    """The parent's tags and metrics from its leaderboard rows (best first; where configurations
    repeat, the best configuration's runs first, and its mean and std as metrics too)."""
    from visiontune import report
    from visiontune.store import tags

    failed = [r for r in rows if r["status"] != "FINISHED"]
    summary = {tags.SWEEP_CHILDREN: str(len(rows)), tags.SWEEP_FAILED: str(len(failed))}
    metrics = {}
    finished = [r for r in rows if r["status"] == "FINISHED" and r["best_val_acc"] is not None]
    if finished:
        summary |= {tags.BEST_CHILD_RUN_ID: finished[0]["run_id"], tags.BEST_CHILD: finished[0]["run"]}
        metrics["best_val_acc"] = finished[0]["best_val_acc"]
    if (configurations := report.configurations(rows)) and configurations[0]["best_val_acc_mean"] is not None:
        best = configurations[0]
        metrics |= {
            "best_val_acc_mean": best["best_val_acc_mean"],
            "best_val_acc_std": best["best_val_acc_std"] or 0.0,
        }
    return summary, metrics


def _message(err: Exception) -> str:
    from visiontune import CAUSE_LIMIT, user_message

    return user_message(err)[:CAUSE_LIMIT]


def _fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(1)
