"""The write path: a run whose status is true, its params, metrics, files and models.

Each write is whole (a Ctrl-C waits for it) and its failure one line that names the store
(StoreError); none other than this package writes to MLflow.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from visiontune import CAUSE_LIMIT, VisiontuneError, redact, user_message
from visiontune.store import outage, tags
from visiontune.store.interrupts import deferred_interrupt
from visiontune.store.location import _ERRNO, StoreError, is_server, open_store, sqlite_path

log = logging.getLogger(__name__)

# MLflow refuses longer values (mlflow.utils.validation: params 6000, tags 8000 characters);
# we shorten instead of failing the run.
PARAM_VALUE_LIMIT = 6000
TAG_VALUE_LIMIT = 5000  # below MLflow's 8000, leaving room for the UI to show a tag whole
# How long a run's end status is retried while another process holds the store (MLflow's SQLite
# connections already wait 20 s per attempt): long enough to outlast a backup or a slow reader.
END_RETRY_SECONDS = 120


@contextlib.contextmanager
def _writing(what: str) -> Iterator[None]:
    """A write to the store: never cut in half by Ctrl-C, and a failure is one line, not a traceback."""
    try:
        with deferred_interrupt():
            yield
    except (mlflow.exceptions.MlflowException, OSError) as err:
        outage.note(err)
        raise StoreError(_fault(what, err)) from err
    except Exception as err:
        if type(err).__module__.split(".")[0] != "sqlalchemy":
            raise
        raise StoreError(_fault(what, err)) from err
    outage.answered()


def _fault(what: str, err: BaseException) -> str:
    uri = mlflow.get_tracking_uri()
    cause = _root_cause(err)
    if is_server(uri):
        refused = _ERRNO.search(cause)
        cause = refused.group(1).strip() if refused else cause
        since = outage.gone_since()
        if since is not None:
            cause += f" (no answer since {time.strftime('%H:%M:%S', time.localtime(since))})"
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
            _retry(lambda: client.set_tag(run_id, tags.ERROR, shorten(error, PARAM_VALUE_LIMIT)))
        _retry(lambda: client.set_terminated(run_id, status))
        if status != "FINISHED":
            log.info("MLflow run %s %s", run_id, status)
    except Exception as err:
        if outage.gone_since() is not None:
            raise StoreError(_lost_server(run_id, err)) from err
        # What stopped the run, unless it was this store's fault too (the cause below says it).
        was = f" after: {shorten(error, 200)}" if error and not error.startswith("cannot ") else ""
        raise StoreError(
            f"could not record MLflow run {run_id} as {status}{was}: {_fault('end the run', err)} "
            f"The store still shows it RUNNING; once the store is writable again, delete it "
            f"(mlflow runs delete --run-id {run_id}) or keep it as a record of the attempt."
        ) from err


def _lost_server(run_id: str, err: BaseException) -> str:
    """The one line of a run whose server went away: what it shows now, and how to go on."""
    return (
        f"{_fault('record the end of MLflow run ' + run_id, err)} The server still shows the run "
        f"RUNNING; once it answers again, continue the run from its last checkpoint with "
        f"resume={run_id}, or delete it (mlflow runs delete --run-id {run_id})."
    )


def _retry(write) -> None:
    """`write()`, again with growing pauses while the store is busy, until END_RETRY_SECONDS pass."""
    deadline, pause = time.monotonic() + END_RETRY_SECONDS, 1.0
    while True:
        try:
            with deferred_interrupt():
                done = write()
            outage.answered()
            return done
        except Exception as err:
            outage.note(err)
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
    and size (a changed, added or removed image changes it), and its file list as the artifact
    splits/<split>.csv. Returns {data.<split>_digest: digest}."""
    from mlflow.data.sources import LocalArtifactDatasetSource

    digests = {}
    contexts = {"train": "training", "val": "validation", "test": "testing"}
    for split, files in samples.items():  # train, val, and test where there is one
        table = split_table(root, classes, files)
        digest = table_digest(table)
        digests[f"data.{split}_digest"] = digest
        # A split the run carved has the whole folder as its source.
        folder = root / split if (root / split).is_dir() else root
        source = LocalArtifactDatasetSource(str(folder))  # named: a bare path resolves two ways
        dataset = mlflow.data.from_pandas(
            table, source=source, targets="class", name=f"{root.name}/{split}", digest=digest
        )
        # MLflow's hint on integer columns, from the schema it infers here, concerns model inputs.
        with _writing(f"record the {split} split"), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            _log_input(dataset, contexts[split])
            mlflow.log_text(table.to_csv(index=False), f"splits/{split}.csv")  # the file list itself
    return digests


def table_digest(table) -> str:
    import hashlib

    return hashlib.sha256(table.to_csv(index=False).encode()).hexdigest()[:16]


def split_digests(root: Path, classes: list[str], samples: Mapping[str, list]) -> dict[str, str]:
    """{data.<split>_digest: digest} as log_datasets records them, without recording anything."""
    return {
        f"data.{split}_digest": table_digest(split_table(root, classes, f)) for split, f in samples.items()
    }


def split_table(root: Path, classes: list[str], files: list[tuple[str, object]]):
    """One split's files as a table: path (relative to root, with / on every system), class (a
    multi-label image's classes joined by |) and size in bytes: what its digest is taken over."""
    import pandas as pd

    def name(label) -> str:
        return "|".join(classes[i] for i in label) if isinstance(label, tuple) else classes[label]

    return pd.DataFrame(
        {
            "path": [Path(os.path.relpath(path, root)).as_posix() for path, _ in files],
            "class": [name(label) for _, label in files],
            "bytes": [os.path.getsize(path) for path, _ in files],
        }
    )


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


def set_tags(values: Mapping[str, str]) -> None:
    """Tags of the active run (keys from store.tags)."""
    with _writing("set tags"):
        mlflow.set_tags(dict(values))


def delete_tag(key: str) -> None:
    """The active run's tag `key` removed, where it has one."""
    with _writing("delete a tag"):
        run_id = mlflow.active_run().info.run_id
        if key in mlflow.get_run(run_id).data.tags:
            mlflow.delete_tag(key)


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


def log_model(classifier, example: bytes, registered_name: str | None = None) -> str:
    """Log a CPU copy of the classifier (its tensors, its spec and the image pyfunc that rebuilds it,
    see flavor.py) with an encoded image as its input example; registered as a new version of
    `registered_name` if given. Returns the model's URI."""
    import torch
    import torchvision
    from mlflow.models import Model

    from visiontune import flavor

    with _writing("save the model"), _installed_requirements_trusted():
        info = Model.log(
            artifact_path=None,  # MLflow 3 names models; the positional path is deprecated
            name="model",
            flavor=flavor,
            classifier=classifier.to(torch.device("cpu")),
            example=example,
            registered_model_name=registered_name or None,
            # MLflow would load the directory it just wrote and predict the example, to warn if that
            # fails (the weights read back: 0.4 s of 1.1 s of CPU for alexnet). The files logged are
            # the same without it; tests/test_store.py loads a logged model back and predicts.
            validate_serving_input=False,
            # Stated, not inferred: inference would start a new Python that imports torch again.
            # What the model's own code (portable.py) imports; visiontune is not among them.
            pip_requirements=[
                f"torch=={torch.__version__.split('+')[0]}",
                f"torchvision=={torchvision.__version__.split('+')[0]}",
                f"pillow=={_version('pillow')}",
                f"pandas=={_version('pandas')}",
                f"numpy=={_version('numpy')}",
                *([f"timm=={_version('timm')}"] if classifier.spec()["source"] == "timm" else []),
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


def aliased_version(uri: str, name: str, alias: str) -> str | None:
    """The version of registered model `name` that `alias` points at; None if none (or no such model)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(open_store(uri).get_model_version_by_alias(name, alias).version)
    except MlflowException:  # RESOURCE_DOES_NOT_EXIST: the model, or the alias, is new
        return None


def tag_version(uri: str, name: str, version: str, values: Mapping[str, str]) -> None:
    """Tags on one registered model version (what the champion gate measured)."""
    client = open_store(uri)
    with _writing(f"tag version {version} of {name}"):
        for key, value in values.items():
            client.set_model_version_tag(name, version, key, value)


def load_model(uri: str):
    """The PyTorch module of a logged model (runs:/<id>/model, models:/<name>/<version or @alias>),
    rebuilt from its tensors (flavor.py): nothing in it is unpickled."""
    from visiontune import flavor

    where = redact(mlflow.get_tracking_uri())
    try:
        local = mlflow.artifacts.download_artifacts(uri)
    except Exception as err:
        raise VisiontuneError(
            f"model.weights={uri}: cannot load that MLflow model from {where} "
            f"({_root_cause(err)}). Check the run id or model name (visiontune-ui shows them)."
        ) from err
    try:
        return flavor.read_directory(Path(local)).module
    except VisiontuneError as err:
        raise VisiontuneError(f"model.weights={uri}: {err}") from None
