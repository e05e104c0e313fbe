"""A Hydra callback that makes each multirun one MLflow parent run with its jobs as children.

The parent opens before any job starts, which also creates the store and the experiment once
(parallel joblib workers never race on a new SQLite file). Its id goes into the sweep folder,
where every job, in this process or a worker process, reads it. When the multirun ends the
parent gets the sweep's leaderboard and accuracy overlay.
"""

from __future__ import annotations

import atexit
import logging
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


class MlflowSweep(Callback):
    def __init__(self) -> None:
        self.uri: str | None = None
        self.parent_id: str | None = None
        self.interrupted = False

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
        from mlflow.tracking import MlflowClient

        from visiontune import tracking

        check_sweeper(config.hydra.sweeper)
        launch_dir = Path(config.hydra.runtime.cwd)
        self.uri = tracking.tracking_uri(config.mlflow.tracking_uri, launch_dir)
        experiment_id = tracking.ensure_experiment(self.uri, config.mlflow.experiment_name)
        sweep_dir = launch_dir / str(config.hydra.sweep.dir)
        overrides = list(config.hydra.overrides.task)
        varied = swept_keys(overrides, config.hydra.sweeper.get("params"))
        # A sweep stopped by Ctrl-C or by its sweeper failing (Optuna, when no trial completed)
        # never reaches on_multirun_end; the parent then ends KILLED or FAILED at exit.
        atexit.register(self._end_abandoned)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._note_interrupt)
        with tracking.deferred_interrupt():  # the id must be kept once the run exists
            run = MlflowClient(self.uri).create_run(
                experiment_id,
                run_name=f"sweep-{'-'.join(varied) or 'jobs'}-{sweep_dir.name}",
                tags={
                    "visiontune.sweep": "parent",
                    "sweep.varied": ",".join(varied),
                    "sweep.overrides": tracking.shorten(" ".join(overrides), 5000),
                    "sweep.dir": str(sweep_dir),
                },
            )
            self.parent_id = run.info.run_id
        tracking.write_sweep(sweep_dir, self.parent_id, varied)
        log.info("MLflow parent run %s for this sweep (varies %s)", self.parent_id, ", ".join(varied) or "-")

    def _summarise(self) -> tuple[list[str], int]:
        """Leaderboard, figure and best child on the parent, which ends FINISHED; (failed jobs, jobs)."""
        from mlflow.tracking import MlflowClient

        from visiontune import compare

        client = MlflowClient(self.uri)
        self._close_orphans(client, "FAILED")
        children = compare.select_runs(client, parent=self.parent_id)
        with tempfile.TemporaryDirectory() as tmp:
            rows = compare.write_report(client, children, Path(tmp))
            client.log_artifacts(self.parent_id, tmp)
            print("\n" + (Path(tmp) / "leaderboard.md").read_text())
        finished = [r for r in rows if r["status"] == "FINISHED" and r["best_val_acc"] is not None]
        if finished:
            client.set_tag(self.parent_id, "best_child_run_id", finished[0]["run_id"])
            client.set_tag(self.parent_id, "best_child", finished[0]["run"])
            client.log_metric(self.parent_id, "best_val_acc", finished[0]["best_val_acc"])
        failed = [r for r in rows if r["status"] != "FINISHED"]
        client.set_tag(self.parent_id, "sweep.children", str(len(rows)))
        client.set_tag(self.parent_id, "sweep.failed", str(len(failed)))
        client.set_terminated(self.parent_id, "FINISHED")
        self.parent_id = None
        return [r["run"] for r in failed], len(rows)

    def _close_orphans(self, client, status: str) -> None:
        """Children still RUNNING once their jobs are over died without reporting (killed, OOM)."""
        from visiontune import compare, tracking

        for child in compare.select_runs(client, parent=self.parent_id):
            if child.info.status == "RUNNING":
                client.set_tag(child.info.run_id, tracking.ERROR_TAG, "the job ended without reporting")
                client.set_terminated(child.info.run_id, status)

    def _note_interrupt(self, signum, frame) -> None:
        self.interrupted = True
        signal.default_int_handler(signum, frame)  # raises KeyboardInterrupt, as without us

    def _end_abandoned(self, reason: str = "the sweep stopped before its end") -> None:
        """End a parent (and children) left RUNNING: KILLED after Ctrl-C, else FAILED. Never raises."""
        if self.parent_id is None:
            return
        from mlflow.tracking import MlflowClient

        from visiontune import tracking

        status = "KILLED" if self.interrupted else "FAILED"
        try:
            client = MlflowClient(self.uri)
            self._close_orphans(client, status)
            if status == "FAILED":
                client.set_tag(self.parent_id, tracking.ERROR_TAG, reason)
                print(f"error: {reason}; its MLflow parent run {self.parent_id} is FAILED", file=sys.stderr)
            client.set_terminated(self.parent_id, status)
            self.parent_id = None
        except Exception as err:
            print(f"error: cannot end the sweep's MLflow parent run: {_message(err)}", file=sys.stderr)


def _message(err: Exception) -> str:
    from visiontune import user_message

    return user_message(err)[:500]


def _fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(1)
