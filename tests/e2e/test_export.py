"""visiontune-export end to end: the file logged on the model's run classifies alone, and --help
answers without torch (real onnxruntime, a real SQLite store)."""

from __future__ import annotations

import io
import json

import numpy as np
import onnx
import onnxruntime
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from helpers import CLASSES, NO_TORCH, classifier_for, cli_env, metadata_props, run_cli
from visiontune import store


def test_export_logs_the_file_on_the_models_run_and_the_file_alone_classifies(tmp_path):
    """The CLI on a run id in a real store; then only the file and its metadata classify a JPEG."""
    uri = f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}"
    model = classifier_for("squeezenet")
    image = np.random.default_rng(0).integers(0, 256, (model.input_size, model.input_size, 3), dtype=np.uint8)
    jpeg = io.BytesIO()
    Image.fromarray(image).save(jpeg, format="JPEG", quality=95)
    start = store.RunStart(store.ensure_experiment(uri, "visiontune"), "train", {})
    with store.tracked_run(uri, start) as run:
        store.log_model(model, jpeg.getvalue())
    run_id = run.info.run_id

    result = run_cli(
        tmp_path, run_id, "--format", "onnx", "--out", "m.onnx", "--log", module="visiontune.commands.export"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith(
        "wrote m.onnx (squeezenet1_0, 2 classes, 64 px): onnxruntime matches PyTorch, max |diff| "
    )
    assert float(result.stdout.split("max |diff| ")[1].split()[0]) < 1e-4
    assert result.stderr == ""  # the exporter's chatter stays back when all is well
    logged = [a.path for a in MlflowClient(uri).list_artifacts(run_id, "onnx")]
    assert logged == ["onnx/m.onnx"]

    # A user of the file, with onnxruntime and numpy alone: scale and normalise by its metadata
    # (the image is input_size square already: resizing and cropping leave it as it is), softmax.
    props = metadata_props(onnx.load(str(tmp_path / "m.onnx")))
    mean, std = np.array(json.loads(props["mean"])), np.array(json.loads(props["std"]))
    pixels = np.array(Image.open(jpeg).convert("RGB"))
    batch = ((pixels / 255 - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"image": batch})
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    expected = model.probabilities(torch.from_numpy(pixels).permute(2, 0, 1)[None]).numpy()
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)  # what the logged model's pyfunc gives
    assert json.loads(props["classes"]) == CLASSES


def test_help_answers_without_importing_torch(tmp_path):
    result = run_cli(
        tmp_path, "--help", module="visiontune.commands.export", env=cli_env(tmp_path) | NO_TORCH
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--opset" in result.stdout
