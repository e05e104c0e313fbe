"""visiontune-export: ONNX files that score as PyTorch does, for every architecture, and carry
everything a user needs to run them (real onnxruntime, a real SQLite store)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from helpers import ARCHS, cli_env, input_size_for, prepare_model, run_cli
from visiontune import store
from visiontune.classifier import Classifier
from visiontune.commands import export

CLASSES = ["ants", "bees"]
NO_TORCH = {"PYTHONPATH": str(Path(__file__).parent / "no_torch")}


def like_trained(module: torch.nn.Module, size: int) -> torch.nn.Module:
    """The module in eval mode, each batch norm holding the statistics of its input on a random
    batch, as training leaves them.

    Scratch weights with unit statistics blow inception's logits up to ~1e10, where a difference
    of 1e-4 says nothing; calibrated, every architecture's logits stay near 1.
    """

    def calibrate(layer, inputs):
        layer.running_mean.copy_(inputs[0].mean((0, 2, 3)))
        layer.running_var.copy_(inputs[0].var((0, 2, 3)))

    layers = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    hooks = [layer.register_forward_pre_hook(calibrate) for layer in layers]
    with torch.no_grad():
        module.eval()(torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1)))
    for hook in hooks:
        hook.remove()
    return module


def classifier_for(model_name: str) -> Classifier:
    prepared = prepare_model(model_name, "scratch")
    size = input_size_for(model_name)
    return Classifier(
        like_trained(prepared.module, size), list(CLASSES), size, model_name, prepared.spec.arch
    )


def metadata_props(model: onnx.ModelProto) -> dict[str, str]:
    return {prop.key: prop.value for prop in model.metadata_props}


# What keeps this file near 40 s by default: densenet121's tracing alone takes ~10 s of CPU here,
# vgg11_bn writes and reloads ~500 MB (alexnet's adaptive pooling and resnet's batch norms are run
# by default). -m slow exports them too.
SLOW = {"densenet", "vgg"}


@pytest.mark.parametrize(
    "model_name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in ARCHS]
)
def test_onnx_file_scores_as_pytorch_does_at_any_batch_size(tmp_path, model_name):
    model = classifier_for(model_name)
    out = tmp_path / "m.onnx"
    parity = export.export_onnx(model, out)
    print(f"{model_name}: max |diff| {parity.max_diff:.1e}, largest |logit| {parity.largest_logit:.2f}")
    assert parity.max_diff < 1e-4  # on batches of 1 and 4: the batch dimension is free
    assert 1e-3 < parity.largest_logit < 100  # logits a trained model gives, not zeros or overflow
    written = onnx.load(str(out))
    (image,) = written.graph.input
    shape = [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim]
    assert (image.name, shape) == ("image", ["batch", 3, model.input_size, model.input_size])
    props = metadata_props(written)
    assert json.loads(props["classes"]) == CLASSES
    assert (props["arch"], props["model"]) == (model.arch, model_name)
    assert json.loads(props["input_size"]) == model.input_size


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


def test_a_run_that_does_not_exist_is_one_error_line(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store.ensure_experiment(uri, "visiontune")
    missing = "0" * 32
    code = export.main([missing, "--out", str(tmp_path / "m.onnx"), "--tracking-uri", uri])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    (line,) = err.splitlines()
    assert line.startswith("visiontune-export: error: cannot find model 0000") and "runs:/<id>/model" in line
    assert not (tmp_path / "m.onnx").exists()


def test_log_is_refused_for_a_model_folder_before_any_work(tmp_path, capsys):
    code = export.main([str(tmp_path), "--out", str(tmp_path / "m.onnx"), "--log"])
    (line,) = capsys.readouterr().err.splitlines()
    assert code == 1 and line.startswith("visiontune-export: error: --log stores the file on the model's run")


def test_help_answers_without_importing_torch(tmp_path):
    result = run_cli(
        tmp_path, "--help", module="visiontune.commands.export", env=cli_env(tmp_path) | NO_TORCH
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--opset" in result.stdout
