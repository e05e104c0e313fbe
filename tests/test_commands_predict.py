"""commands/predict.py in this process, without a trained model. The champion, the pyfunc and a
served model: tests/e2e/test_predict.py."""

from __future__ import annotations

import pytest

from helpers import predict_here


def test_a_folder_that_holds_no_model_is_named(tiny_folder, tmp_path, monkeypatch, capsys):
    args = (str(tiny_folder), str(tiny_folder / "val"))
    code, _, err = predict_here(tmp_path, *args, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and "is a folder but not an MLflow model" in err


def test_tta_answers_the_mean_of_each_image_and_its_mirror(tiny_folder, tmp_path, monkeypatch, capsys):
    """--tta: each row's probabilities are the model's averaged over the image and its mirror."""
    import json

    import torch
    from mlflow.models import Model

    from helpers import classifier_for
    from visiontune import data, flavor

    folder = tmp_path / "model"
    image = next((tiny_folder / "val" / "ants").iterdir())
    flavor.save_model(str(folder), Model(), classifier_for("squeezenet"), image.read_bytes(), ["torch"])
    args = (str(folder), str(image), "--tta", "--top-k", "2", "--format", "json", "--num-workers", "0")
    code, out, err = predict_here(tmp_path, *args, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    (row,) = json.loads(out)
    own = flavor.load(str(folder), "")
    batch = own.transform(data.decode(str(image)))[None]
    expected = (own.probabilities(batch) + own.probabilities(batch.flip(-1))) / 2
    top = torch.topk(expected[0], 2)[0].tolist()
    assert [p["probability"] for p in row["top_k"]] == pytest.approx(top, abs=1e-6)
