"""Where the store lives: its URI and credentials, a server that answers, a SQLite file and its lock.

Opening a store (open_store) and the experiment runs go into (ensure_experiment) happen here, once
per process, before anything is written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from visiontune import CAUSE_LIMIT, VisiontuneError, redact, user_message
from visiontune.store import tags
from visiontune.store.interrupts import deferred_interrupt

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; stores there are opened unguarded
    fcntl = None

log = logging.getLogger(__name__)
# MLflow announces creating and upgrading a store's tables at INFO, and logs a database error
# with its traceback before raising it: we report each failure once, in one line (writes._writing).
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
logging.getLogger("alembic.runtime.migration").setLevel(logging.WARNING)

SQLITE_PREFIX = "sqlite:///"


class StoreError(VisiontuneError):
    """The store refused a write: locked, read-only, full, or gone."""


# MLflow 3.x UIs choose between their GenAI and Model-training views from this experiment tag
# (3.17's reads it when its workflow-type switch is off); visiontune-ui's link also asks for the latter.
EXPERIMENT_KIND = {tags.EXPERIMENT_KIND: "custom_model_development"}


def tracking_uri(configured: str | None, launch_dir: Path) -> str:
    """The config's URI, else $MLFLOW_TRACKING_URI, else a SQLite store in <launch dir>/outputs."""
    if configured:
        return _credentials_to_env(str(configured))
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return _credentials_to_env(os.environ["MLFLOW_TRACKING_URI"])
    return f"{SQLITE_PREFIX}{(launch_dir / 'outputs' / 'mlflow.db').resolve()}"


def _credentials_to_env(uri: str) -> str:
    """http://user:password@host -> http://host, the credentials where MLflow's client reads them.

    A URI with credentials would otherwise reach MLflow's "View run at ..." lines and our logs.
    """
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return uri
    os.environ.setdefault("MLFLOW_TRACKING_USERNAME", urllib.parse.unquote(parts.username or ""))
    os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", urllib.parse.unquote(parts.password or ""))
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def is_server(uri: str) -> bool:
    """Whether `uri` names an MLflow tracking server (HTTP), not a database the client opens itself."""
    return urllib.parse.urlsplit(uri).scheme in ("http", "https")


# How long a server may take to answer the first request. MLflow's own client retries a refused
# connection for minutes (MLFLOW_HTTP_REQUEST_MAX_RETRIES, 7 with a doubling pause): right for
# a run whose server restarts, wrong for a command started against a server that is not there.
SERVER_PROBE_SECONDS = 10


def check_server(uri: str) -> None:
    """A tracking server that does not answer: one line at once, before MLflow's retries start."""
    if not is_server(uri):
        return
    import requests

    try:
        # An API call, not /health: MLflow 3 checks the Host header on its API only. Any other
        # answer will do (a 401 from a server that wants a login): the server is there.
        answer = requests.get(
            f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1", timeout=SERVER_PROBE_SECONDS
        )
    except requests.exceptions.SSLError:
        return  # it answered; MLflow reports its certificate in its own words
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as err:
        raise StoreError(
            f"cannot reach the MLflow server {redact(uri)} ({_connection_fault(err)}): start it "
            f'(docs/how-to/scaling-out.md, "A shared MLflow server") or point the tracking URI at one '
            f"that runs "
            f"(mlflow.tracking_uri=, --tracking-uri or $MLFLOW_TRACKING_URI)"
        ) from None
    if answer.status_code == 403 and "Host header" in answer.text:
        parts = urllib.parse.urlsplit(uri)
        raise StoreError(
            f"the MLflow server {redact(uri)} refuses requests addressed to {parts.netloc} (MLflow 3 "
            f"accepts only localhost and private IP addresses unless told): start it with "
            f"--allowed-hosts {parts.hostname},{parts.netloc}"
        )


def _connection_fault(err: BaseException) -> str:
    """'Connection refused', 'Name or service not known', 'no answer in 10 s': what requests buries."""
    import requests

    if isinstance(err, requests.exceptions.Timeout):
        return f"no answer in {SERVER_PROBE_SECONDS} s"
    found = _ERRNO.search(str(err))
    return found.group(1).strip() if found else type(err).__name__


_ERRNO = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+)")  # what the socket said, inside requests' wrapping


# Filesystem types (as /proc/mounts names them) whose file locks SQLite cannot trust: a store
# there, written by jobs on several machines, fails with "database is locked" or is corrupted.
NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "fuse.ceph",
        "glusterfs", "fuse.glusterfs", "fuse.sshfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.juicefs",
        "9p", "afs", "wekafs",
    }
)  # fmt: skip


def network_mount(path: Path, mounts: str) -> tuple[str, str] | None:
    """(mount point, type) of the network filesystem that holds `path`, from /proc/mounts text;
    None where the filesystem holding it is local (the longest mount point containing it decides)."""
    holder: tuple[str, str] | None = None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        # /proc/mounts writes a space in a mount point as \040 (octal escapes)
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
        inside = path == Path(point) or Path(point) in path.parents
        if inside and (holder is None or len(point) >= len(holder[0])):
            holder = (point, fields[2])
    return holder if holder is not None and holder[1] in NETWORK_FILESYSTEMS else None


_WARNED_NETWORK: set[Path] = set()


def warn_if_network_store(uri: str, mounts_file: Path = Path("/proc/mounts")) -> None:
    """Warn once per store (and process) when a SQLite store lies on a network filesystem."""
    database = sqlite_path(uri)
    if database is None or database in _WARNED_NETWORK:
        return
    _WARNED_NETWORK.add(database)
    try:
        mounts = mounts_file.read_text()
    except OSError:  # not Linux: nothing to look at
        return
    found = network_mount(database.parent.resolve() / database.name, mounts)
    if found is not None:
        point, kind = found
        log.warning(
            "the MLflow store %s is on a network filesystem (%s at %s), where SQLite's locks cannot be "
            "trusted: jobs writing to it from several machines fail with 'database is locked' or corrupt "
            "it. Run an MLflow server and use mlflow.tracking_uri=http://HOST:5000 (docs/how-to/"
            'scaling-out.md, "A shared MLflow server").',
            *(database, kind, point),
        )


def sqlite_path(uri: str) -> Path | None:
    """The database file of a local SQLite store; None for a server or another database."""
    return Path(uri.removeprefix(SQLITE_PREFIX)) if uri.startswith(SQLITE_PREFIX) else None


def missing_store(uri: str) -> Path | None:
    """The file of a local SQLite store that does not exist yet (nothing to read there)."""
    path = sqlite_path(uri)
    return path if path is not None and not path.is_file() else None


def artifact_location(uri: str) -> str | None:
    """Artifacts beside a local SQLite store (outputs/mlartifacts); a server decides its own."""
    path = sqlite_path(uri)
    return None if path is None else (path.parent / "mlartifacts").resolve().as_uri()


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """One process at a time creates or upgrades a SQLite store's tables.

    MLflow migrates a new or older SQLite file when a client opens it; two processes doing that
    at once (a job and `visiontune-compare`, two first runs) break the file for good with
    "table _alembic_tmp_... already exists". A lock file beside the store serialises them.
    """
    database = sqlite_path(uri)
    if database is None or fcntl is None:
        yield
        return
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(database.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def open_store(uri: str) -> MlflowClient:
    """A client on `uri`, its store created or upgraded by this process alone and never half-way.

    A Ctrl-C during MLflow's migrations would leave the file neither old nor new, so it waits.
    """
    with _store_lock(uri), deferred_interrupt():
        return MlflowClient(uri)  # the client builds (and migrates) the store right away


def ensure_experiment(uri: str, name: str) -> str:
    """The experiment's id, creating the store and the experiment if they do not exist yet."""
    check_server(uri)
    warn_if_network_store(uri)
    try:
        client = open_store(uri)
        experiment = client.get_experiment_by_name(name)
    except Exception as err:  # a wrong scheme, a server that is down, a store we cannot open
        raise VisiontuneError(
            f"cannot use the MLflow store mlflow.tracking_uri={uri}: {user_message(err)[:CAUSE_LIMIT]}. "
            f"Check the URI (sqlite:///abs/path.db, http://host:port) or unset it for outputs/mlflow.db."
        ) from err
    _check_artifacts_writable(uri)
    if experiment is None:
        try:
            location = artifact_location(uri)
            return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
        except mlflow.exceptions.MlflowException:
            # Another process created it between our look-up and create: use theirs.
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    for key, value in EXPERIMENT_KIND.items():
        if key not in experiment.tags:  # an experiment made by plain MLflow
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def _check_artifacts_writable(uri: str) -> None:
    """A local store's artifact folder takes files: checked before a run exists, not after training."""
    location = artifact_location(uri)
    if location is None:
        return
    folder = Path(urllib.parse.urlsplit(location).path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise StoreError(
            f"cannot write artifacts to {folder} ({err.strerror}): make it writable, or point "
            f"mlflow.tracking_uri at a store whose folder is"
        ) from err
