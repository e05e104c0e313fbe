"""The store layer against a real SQLite store: true run status, safe params, a faithful model,
stores on network filesystems, a server lost mid-run."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from helpers import SPECS, free_port
from visiontune import VisiontuneError, models, redact, store


@pytest.fixture
def experiment(tmp_path):
    uri = store.tracking_uri(None, tmp_path)
    return uri, store.ensure_experiment(uri, "unit")


# --- location -------------------------------------------------------------------------------------


def test_default_store_is_sqlite_under_outputs(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert store.tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert store.tracking_uri(None, tmp_path) == "http://127.0.0.1:5000"
    assert store.tracking_uri("sqlite:////elsewhere.db", tmp_path) == "sqlite:////elsewhere.db"


def test_experiment_keeps_artifacts_beside_the_store_and_opens_on_training_runs(tmp_path, experiment):
    uri, experiment_id = experiment
    experiment = MlflowClient(uri).get_experiment(experiment_id)
    assert experiment.artifact_location == (tmp_path / "outputs" / "mlartifacts").as_uri()
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert store.ensure_experiment(uri, "unit") == experiment_id  # found, not duplicated


def test_a_password_in_the_uri_moves_where_mlflow_reads_credentials(monkeypatch, tmp_path):
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    assert store.tracking_uri("http://alice:s%40cret@127.0.0.1:5000", tmp_path) == "http://127.0.0.1:5000"
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == (
        "alice",
        "s@cret",
    )


# --- writes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "status"),
    [(None, "FINISHED"), (VisiontuneError("bad lr"), "FAILED"), (KeyboardInterrupt(), "KILLED")],
)
def test_run_status_is_true(experiment, error, status):
    uri, experiment_id = experiment
    with pytest.raises(type(error)) if error else contextlib.nullcontext():  # noqa: SIM117
        with store.tracked_run(uri, store.RunStart(experiment_id, "r", {"model": "resnet"})) as run:
            if error:
                raise error
    finished = MlflowClient(uri).get_run(run.info.run_id)
    assert finished.info.status == status
    assert finished.data.tags["model"] == "resnet"
    assert (finished.data.tags.get("error") == "bad lr") == (status == "FAILED")


def test_long_and_nested_params_are_stored_never_refused(experiment):
    uri, experiment_id = experiment
    config = {
        "data": {"root": "x" * 10_000, "name": "imagefolder"},
        "optimizer": {"_target_": "t", "lr": 0.1},
    }
    params = store.flatten(config)
    assert params == {"data.root": "x" * 10_000, "data.name": "imagefolder", "optimizer.lr": 0.1}
    with store.tracked_run(uri, store.RunStart(experiment_id, "r", {})) as run:
        store.log_params(params)
    stored = MlflowClient(uri).get_run(run.info.run_id).data.params
    assert len(stored["data.root"]) == store.PARAM_VALUE_LIMIT and stored["data.root"].endswith("...")
    assert stored["optimizer.lr"] == "0.1"


def test_logged_model_is_torch_and_an_image_pyfunc_with_its_class_names(experiment, tmp_path):
    import io

    import pandas as pd
    from PIL import Image

    from visiontune.classifier import Classifier

    uri, experiment_id = experiment
    torch.manual_seed(0)
    model = models.build_model(SPECS["resnet"], 3, None).eval()
    inputs = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        expected = model(inputs)
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(jpeg, format="JPEG")
    classes = ["cats", "dogs", "owls"]
    with store.tracked_run(uri, store.RunStart(experiment_id, "r", {})) as run:
        store.log_model(Classifier(model, classes, 64, "resnet", "resnet18"), jpeg.getvalue())
    mlflow.set_tracking_uri(uri)
    model_uri = f"runs:/{run.info.run_id}/model"
    loaded = store.load_model(model_uri)
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs), expected)  # any batch size, same numbers
    info = mlflow.models.get_model_info(model_uri)
    assert (
        info.signature.inputs.input_names() == ["image"] and info.metadata["visiontune"]["classes"] == classes
    )
    example = Path(mlflow.artifacts.download_artifacts(f"{model_uri}/input_example.json"))
    assert example.stat().st_size < 20_000, "an encoded image, not a float tensor as JSON"
    image = pd.DataFrame({"image": [jpeg.getvalue()]})
    answer = mlflow.pyfunc.load_model(model_uri).predict(image, params={"top_k": 3})
    assert sorted(answer["top_classes"][0]) == classes and answer["class"][0] == answer["top_classes"][0][0]


def test_logging_a_model_states_its_requirements_without_scanning_every_distribution(experiment, monkeypatch):
    """MLflow maps every installed distribution's files to modules to check a model's requirements
    (about a second per process); log_model's pins come from this environment, so that is skipped."""
    import importlib_metadata
    from mlflow.utils import environment, requirements_utils

    from visiontune.classifier import Classifier

    scans = []
    monkeypatch.setattr(requirements_utils, "_MODULES_TO_PACKAGES", None)  # as in a fresh process
    monkeypatch.setattr(importlib_metadata, "packages_distributions", lambda: scans.append(1) or {})
    check = environment.warn_dependency_requirement_mismatches
    uri, experiment_id = experiment
    model = models.build_model(SPECS["squeezenet"], 2, None).eval()
    with store.tracked_run(uri, store.RunStart(experiment_id, "r", {})) as run:
        store.log_model(Classifier(model, ["ants", "bees"], 64, "squeezenet", "squeezenet1_0"), _jpeg())
    assert scans == []
    assert environment.warn_dependency_requirement_mismatches is check  # put back for everyone else
    mlflow.set_tracking_uri(uri)
    requirements = Path(
        mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/model/requirements.txt")
    )
    pins = dict(line.split("==") for line in requirements.read_text().split())
    assert pins["torch"] == torch.__version__.split("+")[0] and pins["mlflow"] == mlflow.__version__
    assert {"torchvision", "pillow", "pandas"} <= set(pins)


def _jpeg() -> bytes:
    import io

    from PIL import Image

    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(jpeg, format="JPEG")
    return jpeg.getvalue()


# --- interrupts -----------------------------------------------------------------------------------


def test_ctrl_c_during_a_store_write_waits_for_the_write():
    import os
    import signal

    order = []
    with pytest.raises(KeyboardInterrupt):
        with store.deferred_interrupt():
            os.kill(os.getpid(), signal.SIGINT)
            order.append("write finished")
        order.append("not reached")
    assert order == ["write finished"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# --- tags -----------------------------------------------------------------------------------------


def test_every_tag_key_has_one_name():
    keys = {
        name: value for name, value in vars(store.tags).items() if name.isupper() and isinstance(value, str)
    }
    assert len(set(keys.values())) == len(keys), keys


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("http://alice:s3cr3t@host:5000", "http://alice:***@host:5000"),
        (
            "error at https://u:p@h/x and postgresql://a:b@db/m",
            "error at https://u:***@h/x and postgresql://a:***@db/m",
        ),
        ("https://h/x?token=abc&page=2&api_key=zz", "https://h/x?token=***&page=2&api_key=***"),
        ("sqlite:////home/me/outputs/mlflow.db", "sqlite:////home/me/outputs/mlflow.db"),
    ],
)
def test_credentials_are_redacted_wherever_text_is_shown(text, shown):
    assert redact(text) == shown
    assert redact(shown) == shown


# --- SQLite on a network filesystem ------------------------------------------------------------

MOUNTS = """\
/dev/sda1 / ext4 rw,relatime 0 0
proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
/dev/sdb1 /home/alice/scratch ext4 rw,relatime 0 0
fileserver:/export/home /home nfs4 rw,relatime,vers=4.2 0 0
//nas/team /mnt/team\\040share cifs rw,relatime 0 0
head:/lustre /lustre lustre rw 0 0
"""


@pytest.mark.parametrize(
    ("path", "found"),
    [
        ("/home/alice/project/outputs/mlflow.db", ("/home", "nfs4")),
        ("/home/alice/scratch/outputs/mlflow.db", None),  # a local disk mounted inside the NFS home
        ("/mnt/team share/mlflow.db", ("/mnt/team share", "cifs")),
        ("/lustre/proj/mlflow.db", ("/lustre", "lustre")),
        ("/lustreish/mlflow.db", None),  # a name that starts like a mount point is not inside it
        ("/tmp/mlflow.db", None),
    ],
)
def test_a_store_on_a_network_filesystem_is_found_by_its_mount(path, found):
    assert store.network_mount(Path(path), MOUNTS) == found


def test_a_sqlite_store_on_nfs_is_warned_about_once_with_the_fix(tmp_path, caplog):
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/sda1 / ext4 rw 0 0\nserver:/x {tmp_path / 'shared'} nfs rw 0 0\n")
    uri = f"sqlite:///{tmp_path / 'shared' / 'outputs' / 'mlflow.db'}"
    with caplog.at_level(logging.WARNING, logger="visiontune.store"):
        store.warn_if_network_store(uri, mounts)
        store.warn_if_network_store(uri, mounts)
        store.warn_if_network_store(f"sqlite:///{tmp_path / 'local.db'}", mounts)
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "is on a network filesystem (nfs at" in warning
    assert "mlflow.tracking_uri=http://" in warning, "the warning says what to do instead"


def test_a_server_lost_during_a_run_is_named_with_the_socket_error(monkeypatch):
    """Once a run is going, MLflow's own retries apply (none here); the failure names the server."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setattr(utils, "_tracking_uri", utils._tracking_uri)  # restored for the next tests
    down = f"http://127.0.0.1:{free_port()}"
    mlflow.set_tracking_uri(down)
    try:
        with pytest.raises(store.StoreError) as failed:
            store.end_run("0" * 32, "FAILED", "stopped")
        assert store.outage.gone_since() is not None, "a server that did not answer is taken as gone"
    finally:
        store.outage.answered()  # this process's later tests meet a store that answers
    message = str(failed.value)
    assert f"of MLflow run {'0' * 32} in the MLflow server {down}: Connection refused" in message, message
    assert f"resume={'0' * 32}" in message, "how to go on once the server is back"
    assert "HTTPConnectionPool" not in message
