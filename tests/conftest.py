"""The fixtures the tests share, by name (tests in tests/e2e/ too): tiny real image folders, stand-in
weight files, one finished sweep in a real store, no store inherited between tests. Plain helpers
are in helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import FAST, SPECS, make_image_folder, run_cli, store_runs


@pytest.fixture(autouse=True)
def _fresh_url_opener():
    """urllib builds its global opener on first use, with the proxies of the environment then: a
    test that points the proxies at a closed port (offline_env) would leave that opener to every
    later test in its process, and a download from a local server would fail after it."""
    import urllib.request

    yield
    urllib.request.install_opener(None)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data") / "tiny", {"train": 6, "val": 4})


@pytest.fixture(scope="session")
def standin_weights(tmp_path_factory):
    """arch name -> a state-dict file saved from a randomly initialised 1000-class model."""
    import torch
    from torchvision import models

    folder = tmp_path_factory.mktemp("weights")
    cache: dict[str, Path] = {}
    builder_kwargs = {spec.arch: spec.pretrained_kwargs for spec in SPECS.values()}

    def path_for(arch: str) -> Path:
        if arch not in cache:
            torch.manual_seed(1)
            model = models.get_model(arch, weights=None, **builder_kwargs.get(arch, {}))
            cache[arch] = folder / f"{arch}.pth"
            torch.save(model.state_dict(), cache[arch])
        return cache[arch]

    return path_for


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory, tiny_folder):
    """A launch dir whose store holds one finished sweep of two children, 2 epochs each, the best
    child's model registered as models:/ants@champion.

    Read-only for the tests that share it (compare, the UI, predict, serve).
    """
    from types import SimpleNamespace

    cwd = tmp_path_factory.mktemp("sweep-launch")
    fast = [o for o in FAST if not o.startswith("epochs=")]
    data = ["data=imagefolder", f"data.root={tiny_folder}"]
    registry = "mlflow.registered_model_name=ants"  # the winner becomes models:/ants@champion
    result = run_cli(cwd, "-m", "model=squeezenet,resnet", "mode=scratch", *data, *fast, "epochs=2", registry)
    assert result.returncode == 0, result.stderr[-3000:]
    store = cwd / "outputs" / "mlflow.db"
    runs = store_runs(store)
    (parent,) = [r for r in runs if r.data.tags.get("visiontune.sweep") == "parent"]
    children = {
        r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert len(runs) == 1 + len(children)
    return SimpleNamespace(
        cwd=cwd, store=store, experiment_id=parent.info.experiment_id, parent=parent, children=children
    )


@pytest.fixture(autouse=True)
def no_store_from_earlier_tests(monkeypatch):
    """mlflow.set_tracking_uri also sets $MLFLOW_TRACKING_URI: no test inherits another's store."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
