"""commands/export.py in this process: ONNX files that score as PyTorch does, for every architecture
(real onnxruntime), and the refusals made before any work. The CLI: tests/e2e/test_export.py."""

from __future__ import annotations

import json

import onnx
import pytest

from helpers import ARCHS, CLASSES, classifier_for, metadata_props
from visiontune import store
from visiontune.commands import export

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
