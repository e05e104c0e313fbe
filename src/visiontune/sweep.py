"""A Hydra callback that makes each multirun one MLflow parent run with its jobs as children.

The parent opens before any job starts, which also creates the store and the experiment once
(parallel joblib workers never race on a new SQLite file). Its id goes into the sweep folder,
where every job, in this process or a worker process, reads it. When the multirun ends the
parent gets the sweep's leaderboard and accuracy overlay.
"""

from __future__ import annotations

import atexit
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any, NoReturn

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("visiontune")


def swept_keys(task_overrides) -> list[str]:
    """The keys a multirun varies: model=resnet,vgg and lr=range(...) count, epochs=1 does not."""
    parsed = OverridesParser.create().parse_overrides(list(task_overrides))
    return [o.get_key_element() for o in parsed if o.is_sweep_override()]


class MlflowSweep(Callback):
    def __init__(self) -> None:
        self.uri: str | None = None
        self.parent_id: str | None = None

    # Hydra turns an exception in a callback into a warning and carries on: a sweep would run
    # with no parent, or end with exit 0 after its summary failed. Each hook therefore reports
    # its own failure and exits 1 (SystemExit passes through Hydra).
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            self._open_parent(config)
        except Exception as err:
            _fail(f"cannot start the sweep's MLflow parent run: {_message(err)}")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            failed, total = self._summarise()
        except Exception as err:
            self._end_abandoned("FAILED")
            _fail(f"cannot write the sweep's summary on its MLflow parent run: {_message(err)}")
        if failed:
            # print, not log: after the jobs, logging is configured by whichever job ran last.
            _fail(f"{len(failed)} of {total} jobs failed: {', '.join(failed)}")

    def _open_parent(self, config: DictConfig) -> None:
        from mlflow.tracking import MlflowClient

        from visiontune import tracking

        launch_dir = Path(config.hydra.runtime.cwd)
        self.uri = tracking.tracking_uri(config.mlflow.tracking_uri, launch_dir)
        experiment_id = tracking.ensure_experiment(self.uri, config.mlflow.experiment_name)
        sweep_dir = launch_dir / str(config.hydra.sweep.dir)
        overrides = list(config.hydra.overrides.task)
        varied = swept_keys(overrides)
        # A sweep stopped by Ctrl-C or a crash never reaches on_multirun_end.
        atexit.register(self._end_abandoned)
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
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / tracking.PARENT_RUN_FILE).write_text(self.parent_id)
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

    def _end_abandoned(self, status: str = "KILLED") -> None:
        """End a parent (and children) that the sweep left RUNNING; never raises, it runs at exit."""
        if self.parent_id is None:
            return
        from mlflow.tracking import MlflowClient

        try:
            client = MlflowClient(self.uri)
            self._close_orphans(client, status)
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
