"""The MLflow model a run logs: PyTorch weights for torch users, and a pyfunc that takes images.

`mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"image": [...]}))` takes file paths, raw
encoded bytes or base64 strings and returns, per image, the class name, its probability and the
top k (`params={"top_k": 3}`); `mlflow models serve` answers the same over HTTP. Class names,
input size and normalisation sit in the MLmodel file's metadata, so nothing else is needed.

One model directory holds both flavours: mlflow.pytorch writes the weights and its own
python_function entry, which is then pointed at this module's `_load_pyfunc`.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
from mlflow.models import Model, ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import Array

from visiontune import VisiontuneError, redact
from visiontune.classifier import Classifier, classify_values, top_k

METADATA_KEY = "visiontune"
IMAGE_COLUMN = "image"
COLUMNS = ["class", "probability", "top_classes", "top_probabilities", "error"]  # one row per image


def signature() -> ModelSignature:
    """Images in (binary: MLflow's server base64-decodes them), names and probabilities out."""
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
        inputs=Schema([ColSpec("binary", IMAGE_COLUMN)]),
        outputs=outputs,
        params=ParamSchema([ParamSpec("top_k", "long", 1)]),
    )


def save_model(path: str, mlflow_model: Model, classifier: Classifier, example: bytes, pip_requirements, **_):
    """What mlflow.models.Model.log calls to write the model directory (our 'flavor' module)."""
    import pandas as pd

    mlflow.pytorch.save_model(
        classifier.module,
        path,
        mlflow_model=mlflow_model,
        signature=signature(),
        input_example=pd.DataFrame({IMAGE_COLUMN: [example]}),
        # A pickled nn.Module takes any batch size; MLflow's torch.export format would fix the
        # batch dimension to the input example's.
        serialization_format="pickle",
        pip_requirements=pip_requirements,
        metadata={METADATA_KEY: classifier.metadata()},
    )
    mlflow_model.flavors["python_function"]["loader_module"] = __name__
    mlflow_model.save(os.path.join(path, "MLmodel"))


def _load_pyfunc(data_path: str, model_config: dict | None = None) -> ImageModel:
    """mlflow.pyfunc's entry point; model_config={"device": "cuda"} predicts on a GPU."""
    import torch

    device = torch.device((model_config or {}).get("device") or "cpu")
    return ImageModel(_from_directory(Path(data_path).parent).to(device))


def _from_directory(directory: Path) -> Classifier:
    logged = Model.load(directory)
    meta = logged.metadata or {}
    if METADATA_KEY not in meta:
        raise VisiontuneError(
            f"the model in {directory} has no class names: it was logged by an older visiontune "
            "or by hand. Train it again with this version to get a model that names its classes."
        )
    module = mlflow.pytorch.load_model(str(directory), map_location="cpu")
    source = {"run_id": logged.run_id or "", "model_id": logged.model_id or ""}
    return Classifier.from_metadata(module, meta[METADATA_KEY], **source)


class ImageModel:
    """The pyfunc: a DataFrame of images in, one row of names and probabilities per image out."""

    def __init__(self, classifier: Classifier):
        self.classifier = classifier

    def predict(self, model_input, params: dict | None = None):
        import pandas as pd

        values = _image_values(model_input)
        k = _top_k(params)
        rows = [
            self._row(probabilities, k) if error is None else dict.fromkeys(COLUMNS) | {"error": error}
            for probabilities, error in classify_values(self.classifier, values)
        ]
        # Object columns keep None as None: in float ones pandas turns it into NaN, which a served
        # answer would carry into its JSON, where NaN is not a value.
        return pd.DataFrame(rows, columns=COLUMNS, dtype=object)

    def _row(self, probabilities, k: int) -> dict:
        values, indices = top_k(probabilities.unsqueeze(0), k)
        names = [self.classifier.classes[i] for i in indices[0].tolist()]
        scores = values[0].tolist()
        return {
            "class": names[0],
            "probability": scores[0],
            "top_classes": names,
            "top_probabilities": scores,
            "error": None,  # null in a served answer, where a missing value would be NaN
        }


def _top_k(params: dict | None) -> int:
    """params' top_k, refused below 1 as MLflow refuses a bad request (HTTP 400, one message)."""
    from mlflow.exceptions import MlflowException

    k = int((params or {}).get("top_k", 1))
    if k < 1:
        raise MlflowException.invalid_parameter_value(
            f"top_k={k}: give 1 or more, the number of classes to list per image"
        )
    return k


def _image_values(model_input) -> list:
    """The images of a DataFrame (its `image` column, else its only one), a Series, or a list."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if IMAGE_COLUMN in model_input.columns:
            return list(model_input[IMAGE_COLUMN])
        if len(model_input.columns) == 1:
            return list(model_input.iloc[:, 0])
        raise ValueError(f"expected a column named {IMAGE_COLUMN!r}, got {list(model_input.columns)}")
    if isinstance(model_input, str | bytes):
        return [model_input]
    return list(model_input)


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
        return _from_directory(Path(uri))
    mlflow.set_tracking_uri(tracking_uri)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per file, on stderr
    try:
        local = mlflow.artifacts.download_artifacts(uri)
    except Exception as err:
        raise VisiontuneError(
            f"cannot find model {given} in {redact(tracking_uri)} ({str(err).splitlines()[0][:300]}). "
            "Give a run id, runs:/<id>/model or models:/<name>@<alias> (visiontune-ui lists them)."
        ) from err
    return _from_directory(Path(local))
