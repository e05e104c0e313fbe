"""The logged model's files as a store hands them out: a tampered weights file is refused by every
consumer and never run, a broken model folder is one line, and the model loads where visiontune is
not installed (real processes, a real SQLite store)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from helpers import FAST, classifier_for, cli_env, run_cli
from visiontune import store


class _WritesMarker:
    """Unpickling this runs os.system: what an attacker with write access to a store would plant."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _jpeg(size=(64, 64), seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=95)
    return out.getvalue()


@pytest.fixture
def logged(tmp_path):
    """A squeezenet logged to a store under tmp_path: (tracking URI, run id, its local model folder)."""
    uri = f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}"
    start = store.RunStart(store.ensure_experiment(uri, "visiontune"), "train", {})
    with store.tracked_run(uri, start) as run:
        model_uri = store.log_model(classifier_for("squeezenet"), _jpeg())
    logged_model = MlflowClient(uri).get_logged_model(model_uri.removeprefix("models:/"))
    return uri, run.info.run_id, Path(urlparse(logged_model.artifact_location).path)


def _weights_file(folder: Path) -> Path:
    """The model's largest file: its weights, whatever the format names them."""
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_a_weights_file_replaced_by_a_pickle_is_refused_by_every_loader_and_never_run(
    logged, tmp_path, tiny_folder
):
    import torch

    uri, run_id, folder = logged
    marker = tmp_path / "pwned"
    torch.save({"fc.weight": _WritesMarker(marker)}, _weights_file(folder))
    env = cli_env(tmp_path) | {"MLFLOW_TRACKING_URI": uri}

    predict = run_cli(
        tmp_path, run_id, str(tiny_folder / "val"), module="visiontune.commands.predict", env=env
    )
    assert predict.returncode == 1 and "refused unread" in predict.stderr, predict.stderr[-2000:]
    assert "Traceback" not in predict.stderr and len(predict.stderr.strip().splitlines()) == 1

    args = [f"data.root={tiny_folder}", "data=imagefolder", "mode=feature_extract", *FAST]
    train = run_cli(tmp_path, *args, "model=squeezenet", f"model.weights=runs:/{run_id}/model", env=env)
    assert train.returncode == 1 and "refused unread" in train.stderr, train.stderr[-2000:]

    pyfunc = subprocess.run(
        [sys.executable, "-c", f"import mlflow; mlflow.pyfunc.load_model('runs:/{run_id}/model')"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert pyfunc.returncode != 0 and "refused unread" in pyfunc.stderr, pyfunc.stderr[-2000:]
    assert not marker.exists(), "loading the model ran the pickle's code"


BROKEN = {
    "no spec": ("data/weights/spec.json", None, "spec.json is missing"),
    "garbled spec": ("data/weights/spec.json", b"{not json", "spec.json is not readable JSON"),
    "spec without classes": ("data/weights/spec.json", b'{"format": 2}', "classes"),
    "no weights": ("data/weights/weights.pt", None, "weights.pt is missing"),
    "torn weights": (
        "data/weights/weights.pt",
        b"PK\x03\x04 torn",
        "weights.pt is not a plain file of tensors",
    ),
    "garbled MLmodel": ("MLmodel", b"flavors: [\n", "MLmodel file is missing or unreadable"),
}


# A torn weights file and a garbled MLmodel by default (each case is a CLI start); the rest with -m slow.
CASES = [
    pytest.param(case, marks=() if case in {"torn weights", "garbled MLmodel"} else pytest.mark.slow)
    for case in sorted(BROKEN)
]


@pytest.mark.parametrize("case", CASES)
def test_a_broken_model_folder_is_refused_in_one_line_that_names_the_file(logged, tmp_path, case):
    _, _, logged_folder = logged
    folder = tmp_path / "copy"
    shutil.copytree(logged_folder, folder)
    name, content, message = BROKEN[case]
    if content is None:
        (folder / name).unlink()
    else:
        (folder / name).write_bytes(content)
    image = tmp_path / "a.jpg"
    image.write_bytes(_jpeg())
    result = run_cli(tmp_path, str(folder), str(image), module="visiontune.commands.predict")
    assert result.returncode == 1, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


ISOLATED = """
import json, sys
sys.path[:] = [p for p in sys.argv[1].split(":")] + sys.path
try:
    import visiontune
except ImportError:
    pass
else:
    sys.exit("visiontune is importable here: " + visiontune.__file__)
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[2])
answer = model.predict(pd.DataFrame({"image": sys.argv[3:]}), params={"top_k": 2})
print(json.dumps(answer.to_dict("records")))
"""


def test_the_logged_model_loads_and_predicts_alike_where_visiontune_is_not_installed(logged, tmp_path):
    """-I -S: no site processing, so the editable install's .pth never puts visiontune on sys.path."""
    import base64

    import torch

    from visiontune import data, flavor

    _, _, folder = logged
    images = [_jpeg((64, 64), 1), _jpeg((97, 51), 2), _jpeg((40, 200), 3)]
    site = sysconfig.get_paths()["purelib"]
    encoded = [base64.b64encode(i).decode() for i in images]
    command = [sys.executable, "-I", "-S", "-c", ISOLATED, f"{site}:{sysconfig.get_paths()['platlib']}"]
    result = subprocess.run(
        [*command, str(folder), *encoded],
        cwd=tmp_path,
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads(result.stdout.splitlines()[-1])

    own = flavor.load(str(folder), "")
    batch = torch.stack([own.transform(data.decode(io.BytesIO(i))) for i in images])
    expected = own.probabilities(batch)
    for answer, probabilities in zip(answers, expected, strict=True):
        scores, indices = torch.topk(probabilities, 2)
        assert answer["top_classes"] == [own.classes[i] for i in indices.tolist()]
        np.testing.assert_allclose(answer["top_probabilities"], scores.tolist(), rtol=0, atol=1e-6)
    assert "visiontune" not in (folder / "requirements.txt").read_text()
