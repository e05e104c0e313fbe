"""Everything MLflow: where the store lives, runs whose status is true, params, metrics, models."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from visiontune import VisiontuneError, user_message

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; stores there are opened unguarded
    fcntl = None

log = logging.getLogger(__name__)

# MLflow rejects longer param values (mlflow.utils.validation); we shorten instead of failing.
PARAM_VALUE_LIMIT = 6000
ERROR_TAG = "error"


def tracking_uri(configured: str | None, launch_dir: Path) -> str:
    """The config's URI, else $MLFLOW_TRACKING_URI, else a SQLite store in <launch dir>/outputs."""
    if configured:
        return str(configured)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(launch_dir / 'outputs' / 'mlflow.db').resolve()}"


def artifact_location(uri: str) -> str | None:
    """Artifacts beside a local SQLite store (outputs/mlartifacts); a server decides its own."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()


# Marks the experiment as model training. MLflow 3.17's UI ignores it and picks GenAI vs
# Model training per browser (visiontune-ui's link asks for the latter); kept for MLflow
# versions that read the tag.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """One process at a time creates or upgrades a SQLite store's tables.

    MLflow migrates a new or older SQLite file when a client opens it; two processes doing that
    at once (a job and `visiontune-compare`, two first runs) break the file for good with
    "table _alembic_tmp_... already exists". A lock file beside the store serialises them.
    """
    if not uri.startswith("sqlite:///") or fcntl is None:
        yield
        return
    database = Path(uri.removeprefix("sqlite:///"))
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
    try:
        client = open_store(uri)
        experiment = client.get_experiment_by_name(name)
    except Exception as err:  # a wrong scheme, a server that is down, a store we cannot open
        raise VisiontuneError(
            f"cannot use the MLflow store mlflow.tracking_uri={uri}: {user_message(err)[:500]}. "
            f"Check the URI (sqlite:///abs/path.db, http://host:port) or unset it for outputs/mlflow.db."
        ) from err
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
        if key not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold a Ctrl-C until the block ends, so no write to the store is cut off halfway.

    MLflow's SQLite sessions roll back on Exception, not on KeyboardInterrupt; an interrupt in
    the middle of one can leave a transaction open that the KILLED status update then waits on.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list = []
    previous = signal.signal(signal.SIGINT, lambda *args: received.append(args))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        if callable(previous):  # the handler we stood in for sees the Ctrl-C too
            previous(*received[0])
        if previous != signal.SIG_IGN:
            raise KeyboardInterrupt


@contextlib.contextmanager
def tracked_run(
    uri: str,
    experiment_id: str,
    run_name: str,
    tags: Mapping[str, str],
    parent_run_id: str | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run that ends FINISHED, FAILED (error tag set) or KILLED, whatever happens inside."""
    mlflow.set_tracking_uri(uri)
    with deferred_interrupt():
        run = mlflow.start_run(
            experiment_id=experiment_id, run_name=run_name, tags=dict(tags), parent_run_id=parent_run_id
        )
    try:
        yield run
    except KeyboardInterrupt:
        with deferred_interrupt():
            mlflow.end_run("KILLED")
        raise
    except BaseException as err:
        with deferred_interrupt():
            mlflow.set_tag(ERROR_TAG, user_message(err)[:PARAM_VALUE_LIMIT])
            mlflow.end_run("FAILED")
        raise
    with deferred_interrupt():
        mlflow.end_run("FINISHED")


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
    with deferred_interrupt():
        mlflow.log_params({key: shorten(value) for key, value in params.items()})


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    with deferred_interrupt():
        mlflow.log_metrics(dict(metrics), step=step)


class _KnownPickleChoice(logging.Filter):
    """Drops MLflow's advice to use 'pt2' on every run: we chose pickle on purpose (see log_model)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "serialization_format" not in record.getMessage()


_PICKLE_CHOICE = _KnownPickleChoice()


def log_model(model, example) -> str:
    """Log a CPU copy of `model` with signature and input example; returns its model URI."""
    import torch
    import torchvision
    from mlflow.models import infer_signature

    logging.getLogger("mlflow.pytorch").addFilter(_PICKLE_CHOICE)  # adding it twice is a no-op
    model = model.to("cpu").eval()
    with torch.inference_mode():
        prediction = model(example)
    signature = infer_signature(example.numpy(), prediction.numpy())
    with deferred_interrupt():
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            signature=signature,
            input_example=example.numpy(),
            # A pickled nn.Module takes any batch size; MLflow's torch.export format would fix the
            # batch dimension to the input example's.
            serialization_format="pickle",
            # Stated, not inferred: inference would start a new Python that imports torch again.
            pip_requirements=[
                f"torch=={torch.__version__.split('+')[0]}",
                f"torchvision=={torchvision.__version__.split('+')[0]}",
            ],
        )
    return info.model_uri


# A multirun's parent run id and the keys it varies, written once into the sweep folder before
# any job starts, so that jobs in this process and in joblib's worker processes all find them.
SWEEP_FILE = ".mlflow_sweep.json"


def write_sweep(sweep_dir: Path, parent_run_id: str, varied: list[str]) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / SWEEP_FILE).write_text(json.dumps({"parent_run_id": parent_run_id, "varied": varied}))


def read_sweep(sweep_dir: Path) -> tuple[str | None, list[str]]:
    """(parent run id, varied keys); (None, []) where no sweep callback ran (it was removed)."""
    path = sweep_dir / SWEEP_FILE
    if not path.is_file():
        return None, []
    sweep = json.loads(path.read_text())
    return sweep["parent_run_id"], sweep["varied"]
