"""Using a logged model: the registry's champion, visiontune-predict, the pyfunc, a served model.

All of it on the shared sweep (tiny_sweep): its best child is models:/ants@champion.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from helpers import background_server, cli_env, free_port, huge_png, predict_here, run_cli

CHAMPION = "models:/ants@champion"


@pytest.fixture(scope="module")
def champion(tiny_sweep, tiny_folder):
    """The sweep's registered winner: its run, and the val images with their true classes."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tiny_sweep.store}")
    version = client.get_model_version_by_alias("ants", "champion")
    run = client.get_run(version.run_id)
    val = sorted((tiny_folder / "val").glob("*/*.jpg"))
    return run, val, {str(p): p.parent.name for p in val}


def test_a_sweep_registers_its_best_child_as_champion(tiny_sweep, champion):
    run, _, _ = champion
    assert run.info.run_id == tiny_sweep.parent.data.tags["best_child_run_id"]
    assert tiny_sweep.parent.data.tags["champion"] == CHAMPION


def test_predict_on_the_val_split_reproduces_the_runs_accuracy(tiny_sweep, tiny_folder, champion):
    run, val, truth = champion
    out = tiny_sweep.cwd / "val-predictions.csv"
    args = (CHAMPION, str(tiny_folder / "val"), "--top-k", "2", "--out", str(out), "--num-workers", "1")
    result = run_cli(tiny_sweep.cwd, *args, module="visiontune.commands.predict")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv.DictReader(out.open()))
    assert [r["path"] for r in rows] == [str(p) for p in val]
    assert all(r["class"] in {"ants", "bees"} and r["class_2"] in {"ants", "bees"} for r in rows)
    assert all(float(r["probability"]) >= float(r["probability_2"]) for r in rows)
    accuracy = sum(r["class"] == truth[r["path"]] for r in rows) / len(rows)
    assert accuracy == pytest.approx(run.data.metrics["best_val_acc"], abs=1e-9)


def test_an_unreadable_image_is_a_marked_row_not_a_failure(
    tiny_sweep, champion, tmp_path, monkeypatch, capsys, caplog
):
    run, val, _ = champion
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    given = [str(val[0]), str(broken), str(tmp_path / "*.jpg")]  # a glob that finds broken.jpg again
    args = (run.info.run_id, *given, "--format", "json", "--num-workers", "0")
    code, out, err = predict_here(tiny_sweep.cwd, *args, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err[-2000:]
    rows = json.loads(out)
    assert [r["path"] for r in rows] == [str(val[0]), str(broken)], "each file once, in the order given"
    assert rows[0]["class"] in {"ants", "bees"} and rows[0]["error"] is None
    assert rows[1]["class"] is None and rows[1]["error"] == "unreadable"
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert str(broken) in warning, "one warning line names the file"


def test_links_fifos_and_devices_are_unreadable_rows_never_opened(tiny_sweep, champion, tmp_path):
    """A glob that matches a dangling or a looping link, a FIFO and /dev/zero named on the command
    line: a row marked unreadable each, beside the image's answer, and the command does not block
    (a FIFO opened for reading waits for a writer forever; /dev/zero never ends)."""
    _, val, _ = champion
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    (tmp_path / "loop.jpg").symlink_to(tmp_path / "loop.jpg")
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    given = [str(val[0]), str(tmp_path / "dang*.jpg"), str(tmp_path / "loo?.jpg"), str(fifo), "/dev/zero"]
    args = (CHAMPION, *given, "--format", "json", "--num-workers", "0")
    result = run_cli(tiny_sweep.cwd, *args, module="visiontune.commands.predict", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(result.stdout)
    special = [str(tmp_path / "dangling.jpg"), str(tmp_path / "loop.jpg"), str(fifo), "/dev/zero"]
    assert [r["path"] for r in rows] == [str(val[0]), *special]
    assert rows[0]["class"] in {"ants", "bees"} and rows[0]["error"] is None
    assert all(r["class"] is None and r["error"] == "unreadable" for r in rows[1:])
    for path in special:
        assert path in result.stderr, f"a warning line names {path}"


@pytest.mark.parametrize("missing", ["model", "file"])
def test_predict_names_a_missing_model_or_file_in_one_line(
    tiny_sweep, tiny_folder, missing, monkeypatch, capsys
):
    named = "models:/ants@nobody" if missing == "model" else str(tiny_folder / "nothing-here")
    args = (named, str(tiny_folder)) if missing == "model" else (CHAMPION, named)
    code, out, err = predict_here(tiny_sweep.cwd, *args, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and not out
    (line,) = err.strip().splitlines()
    assert line.startswith("visiontune-predict: error:") and named in line, line


BAD_ARGS = {
    "no such device": (("--device", "gpu"), "device 'gpu' is not a device"),
    "no GPU here": (("--device", "cuda"), "this machine has no CUDA GPU"),
    "no such folder": (("--out", "/nonexistent/p.csv"), "the folder /nonexistent does not exist"),
    "unwritable": (("--out", "/proc/p.csv"), "cannot write --out /proc/p.csv"),
}


@pytest.mark.parametrize("case", BAD_ARGS)
def test_bad_options_are_one_line(tiny_sweep, tiny_folder, case, monkeypatch, capsys):
    import torch

    if case == "no GPU here" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    extra, message = BAD_ARGS[case]
    args = (CHAMPION, str(tiny_folder / "val"), "--num-workers", "0", *extra)
    try:
        code, out, err = predict_here(tiny_sweep.cwd, *args, monkeypatch=monkeypatch, capsys=capsys)
    except SystemExit as exit:  # argparse's own refusals
        code, err = exit.code, capsys.readouterr().err
    assert code in (1, 2) and message in err and "Traceback" not in err, err


def test_the_pyfunc_takes_paths_bytes_and_base64_alike(tiny_sweep, champion, monkeypatch):
    import mlflow
    import pandas as pd

    _, val, _ = champion
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tiny_sweep.store}")
    model = mlflow.pyfunc.load_model(CHAMPION, model_config={"read_paths": True})  # the Python API's choice
    assert model.metadata.metadata["visiontune"]["classes"] == ["ants", "bees"]
    raw = [p.read_bytes() for p in val[:3]]
    given = {
        "paths": [str(p) for p in val[:3]],
        "bytes": raw,
        "base64": [base64.b64encode(b).decode() for b in raw],
    }
    answers = {
        kind: model.predict(pd.DataFrame({"image": v}), params={"top_k": 2}) for kind, v in given.items()
    }
    for kind in ("bytes", "base64"):
        pd.testing.assert_frame_equal(answers[kind], answers["paths"], obj=kind)
    assert list(answers["paths"]["top_classes"].map(sorted)) == [["ants", "bees"]] * 3
    odd = model.predict(pd.DataFrame({"image": [b"GIF89a broken", "not base64 !"]}))
    assert odd["class"].isna().all() and "row 0" in odd["error"][0] and "row 1" in odd["error"][1]


def test_the_pyfunc_marks_a_fifo_or_device_path_unreadable_without_opening_it(
    tiny_sweep, champion, monkeypatch, tmp_path
):
    """Opening a FIFO would wait for a writer forever and /dev/zero never ends: an alarm turns
    such a wait into a failure here instead of a hung test."""
    import signal

    import mlflow
    import pandas as pd

    _, val, _ = champion
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tiny_sweep.store}")
    model = mlflow.pyfunc.load_model(CHAMPION, model_config={"read_paths": True})

    def hung(*_):
        pytest.fail("the pyfunc opened a FIFO or a device and waited")  # no OSError: rows catch those

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        answer = model.predict(pd.DataFrame({"image": [str(val[0]), str(fifo), "/dev/zero"]}))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert answer["class"][0] in {"ants", "bees"} and answer["error"][0] is None
    assert answer["class"][1:].isna().all()
    assert "row 1" in answer["error"][1] and "not a regular file" in answer["error"][1]
    assert "row 2" in answer["error"][2] and "not a regular file" in answer["error"][2]


@contextlib.contextmanager
def served(tiny_sweep, tmp_path):
    """The champion behind `mlflow models serve`, as the README starts it: its URL."""
    port = free_port()
    env = cli_env(tmp_path) | {"MLFLOW_TRACKING_URI": f"sqlite:///{tiny_sweep.store}"}
    # As in an activated virtual environment: MLflow starts the `uvicorn` found on PATH.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", CHAMPION, "--env-manager", "local"]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with background_server(command, tmp_path, env, f"{url}/ping", tmp_path / "serve.log"):
        yield url


def invoke(url: str, images: list[str], top_k: int) -> tuple[int, dict]:
    """The README's request (base64 strings in a dataframe_split, top_k as a param): the HTTP status
    and the answer, parsed as strict JSON (NaN, which JSON has not, is refused)."""
    body = {
        "dataframe_split": {"columns": ["image"], "data": [[i] for i in images]},
        "params": {"top_k": top_k},
    }
    request = urllib.request.Request(
        f"{url}/invocations", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=60) as response:
            status, text = response.status, response.read()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read()
    return status, json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in {text[:300]!r}"))


def test_mlflow_models_serve_answers_with_class_names(tiny_sweep, champion, tmp_path):
    _, val, _ = champion
    with served(tiny_sweep, tmp_path) as url:
        status, answer = invoke(url, [base64.b64encode(p.read_bytes()).decode() for p in val[:2]], top_k=2)
    assert status == 200
    predictions = answer["predictions"]
    assert len(predictions) == 2
    for answer in predictions:
        assert answer["class"] in {"ants", "bees"} and sorted(answer["top_classes"]) == ["ants", "bees"]
        assert answer["probability"] == max(answer["top_probabilities"]) and answer["error"] is None


def test_a_served_model_answers_in_valid_json_an_unreadable_row_and_a_bad_top_k(
    tiny_sweep, champion, tmp_path
):
    """An image that does not decode, a value that is not base64, an image whose header claims too
    many pixels and a server-side path are each a row of nulls with its error, beside the others'
    answers; top_k below 1 is one 400 answer that names it, not a stack trace."""
    _, val, _ = champion
    images = [base64.b64encode(val[0].read_bytes()).decode(), base64.b64encode(b"GIF89a broken").decode()]
    with served(tiny_sweep, tmp_path) as url:
        status, answer = invoke(url, images, top_k=1)
        refused = {k: invoke(url, images[:1], top_k=k) for k in (0, -1)}
        odd_status, odd = invoke(
            url, [images[0], "not base64 !", base64.b64encode(huge_png()).decode(), str(val[0])], 1
        )
    assert status == 200 and odd_status == 200, odd
    odd = odd["predictions"]
    good, bad = answer["predictions"]
    assert good["class"] in {"ants", "bees"} and good["error"] is None
    assert {k: bad[k] for k in ("class", "probability", "top_classes", "top_probabilities")} == dict.fromkeys(
        ("class", "probability", "top_classes", "top_probabilities")
    )
    assert "row 1" in bad["error"] and "not an image" in bad["error"]
    assert "row 1" in odd[1]["error"] and "not base64" in odd[1]["error"], "decoded by us, row by row"
    assert "row 2" in odd[2]["error"] and "169,000,000 pixels" in odd[2]["error"], "refused from its header"
    assert "row 3" in odd[3]["error"] and "not base64" in odd[3]["error"], "a path on the server is not read"
    assert odd[0]["error"] is None and odd[0]["class"] in {"ants", "bees"}
    for k, (status, answer) in refused.items():
        assert status == 400, answer
        assert f"top_k={k}" in answer["message"] and "1 or more" in answer["message"]
        assert "Traceback" not in json.dumps(answer)
