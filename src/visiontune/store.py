"""Everything that writes to MLflow: where the store lives, its lock, runs whose status is true,
params, metrics, figures, models, and a sweep's parent run.

Other modules read runs through a client from `open_store`; none writes to MLflow but here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import tempfile
import threading
import time
import urllib.parse
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from visiontune import CAUSE_LIMIT, VisiontuneError, redact, user_message

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; stores there are opened unguarded
    fcntl = None

log = logging.getLogger(__name__)
# MLflow announces creating and upgrading a store's tables at INFO, and logs a database error
# with its traceback before raising it: we report each failure once, in one line (_writing).
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
logging.getLogger("alembic.runtime.migration").setLevel(logging.WARNING)

# MLflow refuses longer values (mlflow.utils.validation: params 6000, tags 8000 characters);
# we shorten instead of failing the run.
PARAM_VALUE_LIMIT = 6000
TAG_VALUE_LIMIT = 5000  # below MLflow's 8000, leaving room for the UI to show a tag whole
ERROR_TAG = "error"
CHECKPOINT_TAG = "visiontune.checkpoint"  # the folder of a run's checkpoints
DIGEST_TAG = "visiontune.config_digest"  # what resume=last matches a run on
RESUME_TAG = "visiontune.resume_command"  # set on a run stopped early: how to continue it
JOB_TAG = "visiontune.job"  # a sweep child's overrides key: what a resumed sweep finds it by
PROCESS_TAG = "visiontune.process"  # host:pid of the process writing the run, to tell dead ones


def this_process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


SQLITE_PREFIX = "sqlite:///"
# How long a run's end status is retried while another process holds the store (MLflow's SQLite
# connections already wait 20 s per attempt): long enough to outlast a backup or a slow reader.
END_RETRY_SECONDS = 120


class StoreError(VisiontuneError):
    """The store refused a write: locked, read-only, full, or gone."""


# MLflow 3.x UIs choose between their GenAI and Model-training views from this experiment tag
# (3.17's reads it when its workflow-type switch is off); visiontune-ui's link also asks for the latter.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


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
            f'(README, "A shared MLflow server") or point the tracking URI at one that runs '
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
            'it. Run an MLflow server and use mlflow.tracking_uri=http://HOST:5000 (README, "A shared '
            'MLflow server").',
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


_HELD_DURING_WRITES = [signal.SIGINT, signal.SIGTERM]


def hold_during_writes(signum: int) -> None:
    """Hold `signum` too while the store is written (a scheduler's requeue signal, see cli.py)."""
    if signum not in _HELD_DURING_WRITES:
        _HELD_DURING_WRITES.append(signum)


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold a Ctrl-C or SIGTERM until the block ends, so no write to the store is cut off halfway.

    MLflow's SQLite sessions roll back on Exception, not on KeyboardInterrupt; an interrupt in
    the middle of one can leave a transaction open that the KILLED status update then waits on.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list = []
    held = tuple(_HELD_DURING_WRITES)
    previous = {s: signal.signal(s, lambda *args: received.append(args)) for s in held}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if received:
        signum, frame = received[0]
        handler = previous[signum]
        if callable(handler):  # the handler we stood in for sees the signal too
            handler(signum, frame)
        if signum == signal.SIGINT and handler != signal.SIG_IGN:
            raise KeyboardInterrupt
        if signum == signal.SIGTERM and handler == signal.SIG_DFL:
            signal.raise_signal(signum)  # its default, now restored: the process ends


@contextlib.contextmanager
def _writing(what: str) -> Iterator[None]:
    """A write to the store: never cut in half by Ctrl-C, and a failure is one line, not a traceback."""
    try:
        with deferred_interrupt():
            yield
    except (mlflow.exceptions.MlflowException, OSError) as err:
        raise StoreError(_fault(what, err)) from err
    except Exception as err:
        if type(err).__module__.split(".")[0] != "sqlalchemy":
            raise
        raise StoreError(_fault(what, err)) from err


def _fault(what: str, err: BaseException) -> str:
    uri = mlflow.get_tracking_uri()
    cause = _root_cause(err)
    if is_server(uri):
        refused = _ERRNO.search(cause)
        cause = refused.group(1).strip() if refused else cause
        return (
            f"cannot {what} in the MLflow server {redact(uri)}: {cause}. Check that the server is up, "
            f"reachable from this machine, and that its database and artifact folder take writes."
        )
    return (
        f"cannot {what} in the MLflow store {sqlite_path(uri) or uri}: {cause}. Check that it exists, "
        f"is writable, has free disk space and that no other program holds it locked."
    )


def _root_cause(err: BaseException) -> str:
    """The innermost error's first line: the database's own words (`database is locked`)."""
    while True:
        inner = getattr(err, "orig", None) or err.__cause__
        if inner is None or inner is err:
            break
        err = inner
    lines = user_message(err).splitlines() or [type(err).__name__]
    return lines[0][:CAUSE_LIMIT]


def _busy(err: BaseException) -> bool:
    """Whether another program holds the store (worth waiting for), not a store that refuses writes."""
    cause = _root_cause(err).lower()
    return "locked" in cause or "busy" in cause


# --- one training run ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RunStart:
    """A run to open: a new one in an experiment, or (`run_id`) an earlier one to continue."""

    experiment_id: str
    name: str
    tags: Mapping[str, str]
    parent_run_id: str | None = None
    run_id: str | None = None


@contextlib.contextmanager
def tracked_run(uri: str, start: RunStart) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run that ends FINISHED, FAILED (error tag set) or KILLED, whatever happens inside.

    A continued run goes back to RUNNING and keeps its name, tags and params.
    """
    mlflow.set_tracking_uri(uri)
    with _writing("start a run"):
        if start.run_id is not None:
            run = mlflow.start_run(run_id=start.run_id)
        else:
            run = mlflow.start_run(
                experiment_id=start.experiment_id,
                run_name=start.name,
                tags=dict(start.tags),
                parent_run_id=start.parent_run_id,
            )
    try:
        yield run
    except KeyboardInterrupt:
        end_run(run.info.run_id, "KILLED")
        raise
    except BaseException as err:
        end_run(run.info.run_id, "FAILED", user_message(err))
        raise
    end_run(run.info.run_id, "FINISHED")


def end_run(run_id: str, status: str, error: str | None = None) -> None:
    """Record the run's true end, retrying while the store is busy; it never stays the active run.

    MLflow ends a run still active at exit as FINISHED: a failed run whose FAILED could not be
    written would be recorded as a success, and the next job of a sweep could not start its own.
    """
    if mlflow.active_run() is not None and mlflow.active_run().info.run_id == run_id:
        mlflow.tracking.fluent._active_run_stack.get().pop()  # no public call leaves without writing
    client = MlflowClient()
    try:
        if error is not None:
            _retry(lambda: client.set_tag(run_id, ERROR_TAG, shorten(error, PARAM_VALUE_LIMIT)))
        _retry(lambda: client.set_terminated(run_id, status))
        if status != "FINISHED":
            log.info("MLflow run %s %s", run_id, status)
    except Exception as err:
        # What stopped the run, unless it was this store's fault too (the cause below says it).
        was = f" after: {shorten(error, 200)}" if error and not error.startswith("cannot ") else ""
        raise StoreError(
            f"could not record MLflow run {run_id} as {status}{was}: {_fault('end the run', err)} "
            f"The store still shows it RUNNING; once the store is writable again, delete it "
            f"(mlflow runs delete --run-id {run_id}) or keep it as a record of the attempt."
        ) from err


def _retry(write) -> None:
    """`write()`, again with growing pauses while the store is busy, until END_RETRY_SECONDS pass."""
    deadline, pause = time.monotonic() + END_RETRY_SECONDS, 1.0
    while True:
        try:
            with deferred_interrupt():
                return write()
        except Exception as err:
            if not _busy(err) or time.monotonic() + pause > deadline:
                raise
            log.warning("the MLflow store is busy; retrying in %.0f s", pause)
            time.sleep(pause)
            pause = min(pause * 2, 15.0)


def flatten(tree: Mapping, prefix: str = "") -> dict[str, object]:
    """{'optimizer': {'lr': 0.1}} -> {'optimizer.lr': 0.1}; leaves underscored keys out."""
    flat: dict[str, object] = {}
    for key, value in tree.items():
        if str(key).startswith("_"):
            continue
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def shorten(value: object, limit: int = PARAM_VALUE_LIMIT) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def log_params(params: Mapping[str, object]) -> None:
    with _writing("log params"):
        mlflow.log_params({key: shorten(value) for key, value in params.items()})


def log_datasets(
    root: Path, classes: list[str], samples: Mapping[str, list[tuple[str, int]]]
) -> dict[str, str]:
    """Each split as an MLflow dataset input of the active run (the UI's Datasets column), so runs
    on different data are told apart: its source folder and a digest of every file's path, class
    and size (a changed, added or removed image changes it). Returns {data.<split>_digest: digest}."""
    import hashlib

    import pandas as pd
    from mlflow.data.sources import LocalArtifactDatasetSource

    digests = {}
    for split, context in (("train", "training"), ("val", "validation")):
        files = samples[split]
        table = pd.DataFrame(
            {
                "path": [os.path.relpath(path, root) for path, _ in files],
                "class": [classes[label] for _, label in files],
                "bytes": [os.path.getsize(path) for path, _ in files],
            }
        )
        digest = hashlib.sha256(table.to_csv(index=False).encode()).hexdigest()[:16]
        digests[f"data.{split}_digest"] = digest
        source = LocalArtifactDatasetSource(str(root / split))  # named: a bare path resolves two ways
        dataset = mlflow.data.from_pandas(
            table, source=source, targets="class", name=f"{root.name}/{split}", digest=digest
        )
        # MLflow's hint on integer columns, from the schema it infers here, concerns model inputs.
        with _writing(f"record the {split} split"), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            _log_input(dataset, context)
    return digests


def _log_input(dataset, context: str) -> None:
    """mlflow.log_input, for runs that record the same data at the same moment (launches side
    by side, a parallel sweep): MLflow looks the dataset up, then inserts it, and the later of
    two inserts breaks the store's uniqueness rule. By the next try the dataset exists."""
    from mlflow.exceptions import MlflowException

    for attempt in range(3):
        try:
            mlflow.log_input(dataset, context=context)
            return
        except MlflowException as err:
            if "UNIQUE constraint failed: datasets" not in str(err) or attempt == 2:
                raise
            time.sleep(0.1 * (attempt + 1))


def set_tags(tags: Mapping[str, str]) -> None:
    with _writing("set tags"):
        mlflow.set_tags(dict(tags))


def logged_steps(run_id: str, key: str) -> set[int]:
    """The steps at which the run has logged `key` (a continued run logs only the others)."""
    return {m.step for m in MlflowClient().get_metric_history(run_id, key)}


def log_metrics(metrics: Mapping[str, float], step: int | None = None, model_id: str | None = None) -> None:
    """Metrics of the active run; with `model_id` (MLflow 3) they are also the logged model's."""
    with _writing("log metrics"):
        mlflow.log_metrics(dict(metrics), step=step, model_id=model_id or None)


def log_figure(figure, name: str) -> None:
    with _writing(f"save {name}"):
        mlflow.log_figure(figure, name)


def log_files(path: Path, artifact_path: str | None = None, text: bool = True) -> None:
    """A file, or a folder's files, as artifacts of the active run; text has credentials redacted."""
    files = (
        sorted(p for p in path.iterdir() if p.is_file())
        if path.is_dir()
        else [path]
        if path.is_file()
        else []
    )
    if not files:
        return
    if not text:
        with _writing(f"save {path.name}"):
            for file in files:
                mlflow.log_artifact(str(file), artifact_path)
        return
    with tempfile.TemporaryDirectory() as tmp, _writing(f"save {path.name}"):
        for file in files:
            (Path(tmp) / file.name).write_text(redact(file.read_text(errors="replace")))
        mlflow.log_artifacts(tmp, artifact_path)


def add_artifact(uri: str, run_id: str, path: Path, artifact_path: str | None = None) -> str:
    """Add a file to a run that has ended (an export beside the model it came from); its artifact URI."""
    client = open_store(uri)
    with _writing(f"save {path.name}"):
        client.log_artifact(run_id, str(path), artifact_path)
    artifact_uri = client.get_run(run_id).info.artifact_uri
    return "/".join(p for p in (artifact_uri, artifact_path, path.name) if p)


class _KnownPickleChoice(logging.Filter):
    """Drops MLflow's advice to use 'pt2' on every run: we chose pickle on purpose (see log_model)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "serialization_format" not in record.getMessage()


_PICKLE_CHOICE = _KnownPickleChoice()


def log_model(classifier, example: bytes, registered_name: str | None = None) -> str:
    """Log a CPU copy of the classifier (PyTorch and image pyfunc flavours, see flavor.py) with an
    encoded image as its input example; registered as a new version of `registered_name` if given.
    Returns the model's URI."""
    import torch
    import torchvision
    from mlflow.models import Model

    from visiontune import flavor

    logging.getLogger("mlflow.pytorch").addFilter(_PICKLE_CHOICE)  # adding it twice is a no-op
    with _writing("save the model"), _installed_requirements_trusted():
        info = Model.log(
            artifact_path=None,  # MLflow 3 names models; the positional path is deprecated
            name="model",
            flavor=flavor,
            classifier=classifier.to(torch.device("cpu")),
            example=example,
            registered_model_name=registered_name or None,
            # Stated, not inferred: inference would start a new Python that imports torch again.
            # visiontune itself must be installed where the pyfunc is loaded (it holds the loader).
            pip_requirements=[
                f"torch=={torch.__version__.split('+')[0]}",
                f"torchvision=={torchvision.__version__.split('+')[0]}",
                f"pillow=={_version('pillow')}",
                f"pandas=={_version('pandas')}",
            ],
        )
    return info.model_uri


@contextlib.contextmanager
def _installed_requirements_trusted() -> Iterator[None]:
    """MLflow's check of a model's pip requirements against this environment, left out.

    Saving a model, and loading it back to validate its input example, MLflow compares each
    requirement with what is installed; to do so it first maps every file of every installed
    distribution to its module (importlib_metadata.packages_distributions: 1.2 s of a 1.6 s
    log_model here, with about 200 distributions). log_model's requirements are read from this
    very environment, so the comparison cannot find a mismatch. MLflow offers no switch for it:
    its function is replaced where MLflow calls it, and put back after.
    """
    import mlflow.pyfunc
    from mlflow.utils import environment

    name = "warn_dependency_requirement_mismatches"
    callers = (environment, mlflow.pyfunc)  # each imported the function under its own name
    originals = {module: getattr(module, name) for module in callers if hasattr(module, name)}
    for module in originals:
        setattr(module, name, lambda requirements: None)
    try:
        yield
    finally:
        for module, original in originals.items():
            setattr(module, name, original)


def _version(distribution: str) -> str:
    from importlib.metadata import version

    return version(distribution)


def register_model(uri: str, run_id: str, name: str, alias: str | None = None) -> str:
    """Register a run's model as a version of `name` (once: a run already registered keeps its
    version) and point `alias` at it; returns the version. The SQLite store holds the registry too."""
    client = open_store(uri)
    mlflow.set_tracking_uri(uri)
    with _writing(f"register the model as {name}"):
        found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        if found:
            version = found[0].version
        else:  # the run's logged model by its id: runs:/<id>/model makes MLflow 3 warn and look it up
            outputs = client.get_run(run_id).outputs
            models = [o.model_id for o in (outputs.model_outputs if outputs else [])]
            source = f"models:/{models[-1]}" if models else f"runs:/{run_id}/model"
            version = mlflow.register_model(source, name).version
        if alias:
            client.set_registered_model_alias(name, alias, version)
    return str(version)


def load_model(uri: str):
    """The PyTorch module of a logged model (runs:/<id>/model, models:/<name>/<version or @alias>)."""
    try:
        return mlflow.pytorch.load_model(uri, map_location="cpu")
    except Exception as err:
        raise VisiontuneError(
            f"model.weights={uri}: cannot load that MLflow model from {redact(mlflow.get_tracking_uri())} "
            f"({_root_cause(err)}). Check the run id or model name (visiontune-ui shows them)."
        ) from err


# --- a sweep's parent run -----------------------------------------------------------------------


def child_for(client: MlflowClient, parent_run_id: str, job_key: str):
    """The run a sweep's job (by its overrides' key) left under `parent_run_id`, newest first; or None."""
    found = [run for run in children_of(client, parent_run_id) if run.data.tags.get(JOB_TAG) == job_key]
    return max(found, key=lambda run: run.info.start_time) if found else None


def children_of(client: MlflowClient, parent_run_id: str) -> list:
    """Every run nested under `parent_run_id`."""
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    query = f"tags.mlflow.parentRunId = '{parent_run_id}'"
    return client.search_runs([experiment_id], query, max_results=10_000)


class ParentRun:
    """A multirun's parent: created before its jobs, summarised and ended after them."""

    def __init__(self, uri: str, run_id: str):
        self.uri = uri
        self.run_id = run_id

    @classmethod
    def start(cls, uri: str, experiment_id: str, name: str, tags: Mapping[str, str]) -> ParentRun:
        tags = {**tags, PROCESS_TAG: this_process()}
        with deferred_interrupt():  # the id must be kept once the run exists
            run = MlflowClient(uri).create_run(experiment_id, run_name=name, tags=tags)
        return cls(uri, run.info.run_id)

    @classmethod
    def reopen(cls, uri: str, experiment_id: str, which: str, key: str) -> ParentRun:
        """A stopped sweep's parent, RUNNING again: `which` is its run id, or last (same overrides)."""
        client = MlflowClient(uri)
        query = f"tags.`visiontune.sweep` = 'parent' and tags.`sweep.key` = '{key}'"
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
            client.set_tag(found[0].info.run_id, PROCESS_TAG, this_process())
        return cls(uri, found[0].info.run_id)

    def close_orphans(self, status: str) -> None:
        """Children still RUNNING once their jobs are over died without reporting (killed, OOM)."""
        client = MlflowClient(self.uri)
        for child in children_of(client, self.run_id):
            if child.info.status == "RUNNING":
                client.set_tag(child.info.run_id, ERROR_TAG, "the job ended without reporting")
                client.set_terminated(child.info.run_id, status)

    def record(self, report_dir: Path, tags: Mapping[str, str], metrics: Mapping[str, float]) -> None:
        """The sweep's report files, summary tags and metrics on the parent."""
        client = MlflowClient(self.uri)
        client.log_artifacts(self.run_id, str(report_dir))
        for key, value in tags.items():
            client.set_tag(self.run_id, key, value)
        for key, value in metrics.items():
            client.log_metric(self.run_id, key, value)

    def end(self, status: str, error: str | None = None) -> None:
        client = MlflowClient(self.uri)
        if error is not None:
            client.set_tag(self.run_id, ERROR_TAG, shorten(error, TAG_VALUE_LIMIT))
        client.set_terminated(self.run_id, status)


# --- runs whose process died ------------------------------------------------------------------------


def mark_failed(client: MlflowClient, run_id: str, reason: str) -> None:
    with _writing("mark a run FAILED"):
        client.set_tag(run_id, ERROR_TAG, shorten(reason, TAG_VALUE_LIMIT))
        client.set_terminated(run_id, "FAILED")
