"""A sweep's parent run and its children, and the process that writes a run: alive, dead or unknown.

A run left RUNNING by a process that died looks like one in progress; the host:pid tag that every
run carries (tags.PROCESS) tells them apart on that host.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path

from mlflow.tracking import MlflowClient

from visiontune import VisiontuneError
from visiontune.store import tags
from visiontune.store.interrupts import deferred_interrupt
from visiontune.store.writes import TAG_VALUE_LIMIT, _writing, shorten

# --- the process writing a run -----------------------------------------------------------------


def this_process() -> str:
    """host:pid of this process, the value of a run's tags.PROCESS."""
    return f"{socket.gethostname()}:{os.getpid()}"


def process_state(tag: str | None) -> str:
    """dead, alive, or unknown (another host, or a run visiontune did not start) for a host:pid tag."""
    host, _, pid = (tag or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return "unknown"
    cmdline = Path(f"/proc/{pid}/cmdline")
    try:
        # A reused pid belongs to another program. A sweep job that submitit started runs as
        # `python -m submitit.core._submit <folder>`, without visiontune in its command line.
        command = cmdline.read_bytes()
        alive = b"visiontune" in command or b"submitit" in command
    except OSError:
        return "dead"
    return "alive" if alive else "dead"


def mark_failed(client: MlflowClient, run_id: str, reason: str) -> None:
    """End a run whose process died without reporting: FAILED, `reason` as its error."""
    with _writing("mark a run FAILED"):
        client.set_tag(run_id, tags.ERROR, shorten(reason, TAG_VALUE_LIMIT))
        client.set_terminated(run_id, "FAILED")


# --- a sweep's parent run -----------------------------------------------------------------------


def child_for(client: MlflowClient, parent_run_id: str, job_key: str):
    """The run a sweep's job (by its overrides' key) left under `parent_run_id`, newest first; or None."""
    found = [run for run in children_of(client, parent_run_id) if run.data.tags.get(tags.JOB) == job_key]
    return max(found, key=lambda run: run.info.start_time) if found else None


def children_of(client: MlflowClient, parent_run_id: str) -> list:
    """Every run nested under `parent_run_id`."""
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    query = f"tags.{tags.PARENT_RUN} = '{parent_run_id}'"
    return client.search_runs([experiment_id], query, max_results=10_000)


class ParentRun:
    """A multirun's parent: created before its jobs, summarised and ended after them."""

    def __init__(self, uri: str, run_id: str):
        self.uri = uri
        self.run_id = run_id

    @classmethod
    def start(cls, uri: str, experiment_id: str, name: str, sweep_tags: Mapping[str, str]) -> ParentRun:
        opening = {**sweep_tags, tags.PROCESS: this_process()}
        with deferred_interrupt():  # the id must be kept once the run exists
            run = MlflowClient(uri).create_run(experiment_id, run_name=name, tags=opening)
        return cls(uri, run.info.run_id)

    @classmethod
    def reopen(cls, uri: str, experiment_id: str, which: str, key: str) -> ParentRun:
        """A stopped sweep's parent, RUNNING again: `which` is its run id, or last (same overrides)."""
        client = MlflowClient(uri)
        query = f"tags.`{tags.SWEEP}` = 'parent' and tags.`{tags.SWEEP_KEY}` = '{key}'"
        if which != "last":
            query += f" and attributes.run_id = '{which}'"
        else:
            query += " and attributes.status != 'FINISHED'"
        found = client.search_runs(
            [experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1
        )
        if not found:
            raise VisiontuneError(
                f"resume={which}: no stopped sweep in this experiment has these overrides; give the same "
                f"command as the sweep to resume (plus resume=last), or its parent run id"
            )
        with _writing("reopen the sweep's parent run"):
            client.update_run(found[0].info.run_id, status="RUNNING")
            client.set_tag(found[0].info.run_id, tags.PROCESS, this_process())
        return cls(uri, found[0].info.run_id)

    def close_orphans(self, status: str) -> None:
        """Children still RUNNING once their jobs are over died without reporting (killed, OOM)."""
        client = MlflowClient(self.uri)
        for child in children_of(client, self.run_id):
            if child.info.status == "RUNNING":
                client.set_tag(child.info.run_id, tags.ERROR, "the job ended without reporting")
                client.set_terminated(child.info.run_id, status)

    def record(self, report_dir: Path, summary: Mapping[str, str], metrics: Mapping[str, float]) -> None:
        """The sweep's report files, summary tags and metrics on the parent."""
        client = MlflowClient(self.uri)
        client.log_artifacts(self.run_id, str(report_dir))
        for key, value in summary.items():
            client.set_tag(self.run_id, key, value)
        for key, value in metrics.items():
            client.log_metric(self.run_id, key, value)

    def end(self, status: str, error: str | None = None) -> None:
        client = MlflowClient(self.uri)
        if error is not None:
            client.set_tag(self.run_id, tags.ERROR, shorten(error, TAG_VALUE_LIMIT))
        client.set_terminated(self.run_id, status)
