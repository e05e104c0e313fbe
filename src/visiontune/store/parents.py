"""A sweep's parent run and its children, and the process that writes a run: alive, dead or unknown.

A run left RUNNING by a process that died looks like one in progress; the host:pid tag that every
run carries (tags.PROCESS) tells them apart on that host.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path

from mlflow.tracking import MlflowClient

from visiontune import VisiontuneError
from visiontune.store import tags
from visiontune.store.interrupts import deferred_interrupt
from visiontune.store.location import fcntl, sqlite_path
from visiontune.store.writes import TAG_VALUE_LIMIT, _writing, shorten

# --- the process writing a run -----------------------------------------------------------------


def this_process() -> str:
    """host:pid@start of this process, the value of a run's tags.PROCESS (start: when the kernel
    started it, so that a pid used again, as in a restarted container, names another process)."""
    return f"{socket.gethostname()}:{os.getpid()}@{_started(os.getpid())}"


def _started(pid: int | str) -> str:
    """The process's start time in clock ticks after boot (Linux); "" where it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[19]  # field 22; the name in (...) may hold spaces
    except (OSError, IndexError):
        return ""


def process_state(tag: str | None) -> str:
    """dead, alive, or unknown (another host, or a run visiontune did not start) for a
    host:pid@start tag (or the host:pid of runs recorded before start times were)."""
    host, _, process = (tag or "").rpartition(":")
    pid, _, start = process.partition("@")
    if host != socket.gethostname() or not pid.isdigit():
        return "unknown"
    if int(pid) == os.getpid():  # asking about a run is never training it: our pid is another's, reused
        return "dead"
    if start and _started(pid) != start:
        return "dead"  # that pid now belongs to a process started later
    try:
        # A reused pid belongs to another program. A sweep job that submitit started runs as
        # `python -m submitit.core._submit <folder>`, without visiontune in its command line.
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
        alive = b"visiontune" in command or b"submitit" in command
    except OSError:
        return "dead"
    return "alive" if alive else "dead"


@contextlib.contextmanager
def holding(uri: str, run_id: str) -> Iterator[None]:
    """This process trains `run_id`, and no other may at the same time: a lock beside a SQLite store
    (one byte of one file per run), taken at once or refused. Two processes continuing the same run
    (two `resume=<id>` launched together) both saw it unclaimed; only one gets its lock. The kernel
    lets go of it however the process ends, SIGKILL included. Runs in an MLflow server's store rely
    on the process tag alone."""
    database = sqlite_path(uri)
    if database is None or fcntl is None:
        yield
        return
    byte = int(hashlib.sha256(run_id.encode()).hexdigest()[:15], 16)  # one byte per run, far apart
    with open(database.with_name(database.name + ".runs"), "a") as file:
        try:
            fcntl.lockf(file, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, byte)
        except OSError:
            raise VisiontuneError(
                f"run {run_id} is being trained by another process right now; let it end or stop it "
                f"first (a run continued twice at once would log every epoch twice)"
            ) from None
        try:
            yield
        finally:
            fcntl.lockf(file, fcntl.LOCK_UN, 1, byte)


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

    def end(self, status: str, error: str | None = None, resume_command: str | None = None) -> None:
        client = MlflowClient(self.uri)
        if error is not None:
            client.set_tag(self.run_id, tags.ERROR, shorten(error, TAG_VALUE_LIMIT))
        if resume_command is not None:
            client.set_tag(self.run_id, tags.RESUME_COMMAND, shorten(resume_command, TAG_VALUE_LIMIT))
        client.set_terminated(self.run_id, status)
