"""The MLflow model a run logs: a state dict, the spec that rebuilds its module, and an image pyfunc.

`mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"image": [...]}))` takes raw encoded bytes or
base64 strings (file paths too, loaded with `model_config={"read_paths": True}`) and returns, per
image, the class name, its probability and the top k (`params={"top_k": 3}`; `"tta": True` averages
the image's and its mirror's); `mlflow models serve` answers the same over HTTP. The pyfunc's code
travels in the model (portable.py, as `code/visiontune_model.py`): loading it needs torch and
torchvision, not visiontune.

Nothing in a model directory is unpickled: the weights are tensors read with
`torch.load(weights_only=True)`, the spec is JSON. Models logged before (a pickled module under
MLflow's pytorch flavour) load only where the user says they trust the store (TRUST_PICKLES).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import mlflow
from mlflow.models import Model, ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import Array

from visiontune import VisiontuneError, portable, redact
from visiontune.classifier import Classifier

METADATA_KEY = "visiontune"
IMAGE_COLUMN = portable.IMAGE_COLUMN
CODE_MODULE = "visiontune_model"  # portable.py's name inside a model: no clash with visiontune
# Set to 1 to load models logged before weights were saved as tensors: unpickling runs any code
# the file holds, so only for stores whose every writer you trust.
TRUST_PICKLES = "VISIONTUNE_TRUST_PICKLED_MODELS"


def signature() -> ModelSignature:
    """Images in as strings (base64: decoded row by row, so one bad value fails only its row),
    names and probabilities out."""
    outputs = Schema(
        [
            ColSpec("string", "class", required=False),  # empty for an image that could not be read
            ColSpec("double", "probability", required=False),
            ColSpec(Array("string"), "top_classes", required=False),
            ColSpec(Array("double"), "top_probabilities", required=False),
            ColSpec("string", "error", required=False),
        ]
    )
    return ModelSignature(
        inputs=Schema([ColSpec("string", IMAGE_COLUMN)]),
        outputs=outputs,
        params=ParamSchema([ParamSpec("top_k", "long", 1), ParamSpec("tta", "boolean", False)]),
    )


def save_model(path: str, mlflow_model: Model, classifier: Classifier, example: bytes, pip_requirements, **_):
    """What mlflow.models.Model.log calls to write the model directory (our 'flavor' module)."""
    import base64

    import pandas as pd

    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights"
        portable.save(weights, classifier.module, classifier.spec())
        code = Path(tmp) / f"{CODE_MODULE}.py"
        shutil.copyfile(portable.__file__, code)
        mlflow.pyfunc.save_model(
            path,
            loader_module=CODE_MODULE,
            data_path=str(weights),
            code_paths=[str(code)],
            mlflow_model=mlflow_model,
            signature=signature(),
            input_example=pd.DataFrame({IMAGE_COLUMN: [base64.b64encode(example).decode()]}),
            pip_requirements=pip_requirements,
            # The keys a loader may set (MLflow ignores others); null: the environment's or the default.
            model_config=portable.LOAD_SETTINGS,
            metadata={METADATA_KEY: classifier.metadata() | {"format": portable.FORMAT}},
        )


def _load_pyfunc(data_path: str, model_config: dict | None = None):
    """mlflow.pyfunc's entry point for models logged before format 2 (their MLmodel names this
    module): the pickled module, loaded only where TRUST_PICKLES says so."""
    classifier = read_directory(Path(data_path).parent)
    return portable.ImageModel(classifier.module, classifier.metadata(), portable.settings(model_config))


def read_directory(directory: Path) -> Classifier:
    """The classifier in a local model directory, or one line that says what is wrong with it."""
    try:
        logged = Model.load(directory)
    except Exception as err:  # a missing or garbled MLmodel file: YAML, key or type errors
        raise VisiontuneError(
            f"{directory}: its MLmodel file is missing or unreadable ({_first(err)})"
        ) from None
    meta = logged.metadata or {}
    if not isinstance(meta.get(METADATA_KEY), dict):
        raise VisiontuneError(
            f"the model in {directory} has no class names: it was logged by an older visiontune "
            "or by hand. Train it again with this version to get a model that names its classes."
        )
    source = {"run_id": logged.run_id or "", "model_id": logged.model_id or ""}
    pyfunc = logged.flavors.get("python_function") or {}
    if pyfunc.get("loader_module") == CODE_MODULE:
        data_dir = (directory / str(pyfunc.get("data") or "data")).resolve()
        try:
            if not data_dir.is_relative_to(directory.resolve()):  # MLmodel's data: ../../elsewhere
                raise portable.ModelFileError(f"its data folder {data_dir} lies outside the model")
            spec = portable.read_spec(data_dir)
            module = portable.load_module(data_dir, spec)
        except portable.ModelFileError as err:
            raise VisiontuneError(f"refusing the model in {directory}: {err}") from None
        return Classifier.from_metadata(
            module, spec | {"model": meta[METADATA_KEY].get("model", "")}, **source
        )
    return _pickled(directory, logged, source)


def _pickled(directory: Path, logged: Model, source: dict) -> Classifier:
    """A model of visiontune before format 2: a pickled module, run as code when loaded."""
    if "pytorch" not in logged.flavors:
        raise VisiontuneError(
            f"{directory} holds no weights visiontune can read (no spec.json, no pytorch flavour)"
        )
    if os.environ.get(TRUST_PICKLES) != "1":
        raise VisiontuneError(
            f"the model in {directory} was logged by an earlier visiontune as a pickle, and unpickling "
            f"runs whatever code the file holds. If you trust everyone who can write to this store, "
            f"load it with {TRUST_PICKLES}=1 (and train or log it again to get a tensors-only model)."
        )
    try:
        module = mlflow.pytorch.load_model(str(directory), map_location="cpu")
    except Exception as err:
        raise VisiontuneError(f"cannot load the pickled model in {directory} ({_first(err)})") from None
    return Classifier.from_metadata(module, logged.metadata[METADATA_KEY], **source)


def _first(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:300] if lines else type(err).__name__


def model_uri(given: str) -> str:
    """A run id as users copy it from the UI or a log line -> runs:/<id>/model; URIs as they are."""
    if "/" not in given and ":" not in given and len(given) == 32:
        return f"runs:/{given}/model"
    return given


def load(given: str, tracking_uri: str) -> Classifier:
    """The classifier logged at a run id, runs:/, models:/<name>/<version>, models:/<name>@<alias>,
    or a local model directory."""
    uri = model_uri(given)
    if Path(uri).is_dir():
        if not (Path(uri) / "MLmodel").is_file():
            raise VisiontuneError(
                f"{given} is a folder but not an MLflow model (no MLmodel file in it). Give a run id, "
                "runs:/<id>/model, models:/<name>@<alias>, or a folder that holds a model's MLmodel file."
            )
        return read_directory(Path(uri))
    mlflow.set_tracking_uri(tracking_uri)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per file, on stderr
    try:
        local = mlflow.artifacts.download_artifacts(uri)
    except Exception as err:
        raise VisiontuneError(
            f"cannot find model {given} in {redact(tracking_uri)} ({str(err).splitlines()[0][:300]}). "
            "Give a run id, runs:/<id>/model or models:/<name>@<alias> (visiontune-ui lists them)."
        ) from err
    return read_directory(Path(local))
