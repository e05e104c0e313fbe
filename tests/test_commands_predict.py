"""commands/predict.py in this process, without a trained model. The champion, the pyfunc and a
served model: tests/e2e/test_predict.py."""

from __future__ import annotations

from helpers import predict_here


def test_a_folder_that_holds_no_model_is_named(tiny_folder, tmp_path, monkeypatch, capsys):
    args = (str(tiny_folder), str(tiny_folder / "val"))
    code, _, err = predict_here(tmp_path, *args, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and "is a folder but not an MLflow model" in err
