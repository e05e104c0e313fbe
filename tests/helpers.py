"""Plain helpers the tests import (`from helpers import ...`): the real config and model specs, tiny
real image folders, the real CLI run as a user runs it, the real store, the offline proxy, local
servers, and what the documentation, export and predict tests share. Fixtures live in conftest.py.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from hydra import compose, initialize_config_module
from PIL import Image

from visiontune import config

if TYPE_CHECKING:
    import onnx
    import torch

    from visiontune.classifier import Classifier

# No test reaches the network: MLflow's usage telemetry stays off in this process and the CLIs.
NO_TELEMETRY = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
os.environ.update(NO_TELEMETRY)


REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "hymenoptera_data"
MODES = ("finetune", "feature_extract", "scratch", "staged")


def compose_cfg(*overrides: str):
    """The real config, composed through Hydra's compose API exactly as the CLI composes it."""
    with initialize_config_module(config_module="visiontune.conf", version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


# The architecture table the tests parametrize over: the shipped model YAMLs, read as specs.
SPECS = {name: config.model_spec(compose_cfg(f"model={name}").model) for name in config.model_names()}


ARCHS = list(SPECS)


def input_size_for(model_name: str) -> int:
    """Small inputs keep CPU tests fast, down to what the model accepts (inception: 299)."""
    return max(64, SPECS[model_name].min_input_size)


def offline_env(env: dict) -> dict:
    """`env` with a closed localhost port as proxy: downloads fail at once, never leaving this machine."""
    env = dict(env) | {
        var: "http://127.0.0.1:9" for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY")
    }
    env.pop("no_proxy", None)
    env.pop("NO_PROXY", None)
    return env


def make_image_folder(root: Path, per_class: dict[str, int], classes=("ants", "bees"), size=(48, 40)) -> Path:
    """root/<split>/<class>/*.jpg: real JPEGs, each class a different dominant colour plus noise."""
    rng = np.random.default_rng(0)
    for split, count in per_class.items():
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 90, size=(size[1], size[0], 3), dtype=np.uint8)
                pixels[..., label % 3] += 150
                Image.fromarray(pixels).save(folder / f"{name}_{i}.jpg", quality=90)
    return root


def cli_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))} | NO_TELEMETRY
    env["TORCH_HOME"] = str(tmp_path / "torch_home")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cli(cwd: Path, *args: str, module: str = "visiontune.train", env=None, timeout=600):
    """Run a visiontune command as a user would, in `cwd`; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env or cli_env(cwd),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# Overrides that make a CLI run take seconds on a CPU.
FAST = ("epochs=1", "num_workers=0", "batch_size=4", "model.input_size=64")


def store_runs(store: Path, experiment: str = "visiontune"):
    """Every run in the SQLite store at `store`, as MLflow's client returns them."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store}")
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], max_results=1000)


def count_in_store(store: Path, query: str, *params) -> int:
    """The number `query` (a SELECT COUNT) finds in the SQLite store at `store`, read without MLflow;
    0 before the store or its tables exist.

    An MLflow client would create or migrate the store while the process under test is doing
    the same; a read-only SQLite connection changes nothing.
    """
    import sqlite3

    if not store.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"{store.as_uri()}?mode=ro", uri=True)) as db:
            return db.execute(query, params).fetchone()[0]
    except sqlite3.Error:  # no tables yet
        return 0


def has_metric(store: Path, key: str) -> bool:
    """Whether any run in the store has logged `key`."""
    return count_in_store(store, "SELECT COUNT(*) FROM metrics WHERE key = ?", key) > 0


@contextlib.contextmanager
def after_first_epoch(cwd: Path, *args: str, poll: float = 0.1):
    """visiontune-train running in `cwd`, handed over once a run has logged an epoch.

    Yields a namespace with the process; after the block, its exit code is there and `stderr`
    holds what it printed. The process never outlives the block.
    """
    import time
    from types import SimpleNamespace

    process = subprocess.Popen(
        [sys.executable, "-m", "visiontune.train", *args],
        **{
            "cwd": cwd,
            "env": cli_env(cwd),
            "stdout": subprocess.DEVNULL,
            "stderr": subprocess.PIPE,
            "text": True,
        },
        start_new_session=True,  # a process group of its own, as a terminal or SLURM gives a job
    )
    running = SimpleNamespace(process=process, stderr="")
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not has_metric(cwd / "outputs" / "mlflow.db", "val_acc"):
            time.sleep(poll)
        yield running
        running.stderr = process.communicate(timeout=180)[1]
    finally:
        process.kill()


def interrupt_once_training(cwd: Path, *args: str) -> tuple[int, str]:
    """Start visiontune-train, press Ctrl-C once a run has logged an epoch; (exit code, stderr)."""
    import signal

    with after_first_epoch(cwd, *args, poll=0.5) as running:
        running.process.send_signal(signal.SIGINT)
    return running.process.returncode, running.stderr


def prepare_model(model_name: str, mode: str, standin_weights=None, num_classes: int = 2, *overrides: str):
    """models.prepare for a shipped model and mode, pretrained modes from stand-in weights."""
    import torch

    from visiontune import models

    cfg = compose_cfg(f"model={model_name}", f"mode={mode}", *overrides)
    spec, parsed = config.model_spec(cfg.model), config.mode_of(cfg.mode)
    weights = None
    if parsed.pretrained:
        weights = models.Weights(spec.arch, str(standin_weights(spec.arch)), kind="file")
    torch.manual_seed(0)
    return models.prepare(spec, parsed, num_classes, weights)


def tiny_prepared(module):
    """A PreparedModel of a small module whose layer "1" is its head, everything training."""
    from visiontune import models

    spec = config.ModelSpec(name="tiny", arch="-", head="1", input_size=2)
    mode = config.Mode("scratch", pretrained=False, trainable_from="head", freeze_norm_stats=False)
    prepared = models.PreparedModel(module, spec, mode, None, models.layer_groups(module, spec))
    prepared.enter_epoch(1)
    return prepared


def cpu_training(prepared, optimizer, epochs: int = 1, runtime=None, scheduler=None):
    """engine.Training on the CPU in float32, inputs taken as they are (no normalisation)."""
    import torch

    from visiontune import engine
    from visiontune.runtime import Runtime

    runtime = runtime or Runtime(torch.device("cpu"), normalize=torch.nn.Identity())
    return engine.Training(
        model=prepared,
        criterion=torch.nn.CrossEntropyLoss(),
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        runtime=runtime,
        epochs=epochs,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    try:
        with opener.open(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def background_server(command: list[str], cwd: Path, env: dict, health_url: str, log_path: Path):
    """A real server process on localhost, up once `health_url` answers, stopped at the end."""
    import signal
    import time

    with open(log_path, "w") as log:
        # Its own session, so teardown can stop uvicorn and any helper it spawned in one signal.
        output = {"stdout": log, "stderr": subprocess.STDOUT}
        server = subprocess.Popen(command, cwd=cwd, env=env, **output, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not answers(health_url):
            assert server.poll() is None, (
                f"{command[2]} exited {server.returncode}:\n{log_path.read_text()[-3000:]}"
            )
            assert time.monotonic() < deadline, (
                f"{command[2]} silent for 60 s:\n{log_path.read_text()[-3000:]}"
            )
            time.sleep(0.5)
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=15)


# Python refuses to import torch in a process run with this: config checks must not need it.
NO_TORCH = {"PYTHONPATH": str(Path(__file__).parent / "no_torch")}


# --- the documentation: tests/test_docs.py checks the pages, tests/e2e/test_docs.py runs their commands

DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]
FENCE = re.compile(r"^```(?:bash|sh|shell|console)\n(.*?)^```", re.M | re.S)


def _load_reference():
    spec = importlib.util.spec_from_file_location("docs_reference", DOCS / "hooks" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reference = _load_reference()


def documented_commands() -> list[tuple[str, str]]:
    """(page, command line) for each visiontune-train line in a shell block, continuations joined."""
    found, seen = [], set()
    for page in PAGES:
        for block in FENCE.findall(page.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.strip().removeprefix("$ ").removeprefix(".venv/bin/")
                if line.startswith("visiontune-train") and line not in seen:  # each once
                    seen.add(line)
                    found.append((str(page.relative_to(REPO)), line))
    return found


COMMANDS = documented_commands()


# --- ONNX export: tests/test_commands_export.py and tests/e2e/test_export.py

CLASSES = ["ants", "bees"]


def like_trained(module: torch.nn.Module, size: int) -> torch.nn.Module:
    """The module in eval mode, each batch norm holding the statistics of its input on a random
    batch, as training leaves them.

    Scratch weights with unit statistics blow inception's logits up to ~1e10, where a difference
    of 1e-4 says nothing; calibrated, every architecture's logits stay near 1.
    """
    import torch

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
    from visiontune.classifier import Classifier

    prepared = prepare_model(model_name, "scratch")
    size = input_size_for(model_name)
    return Classifier(
        like_trained(prepared.module, size), list(CLASSES), size, model_name, prepared.spec.arch
    )


def metadata_props(model: onnx.ModelProto) -> dict[str, str]:
    return {prop.key: prop.value for prop in model.metadata_props}


def predict_here(cwd: Path, *args: str, monkeypatch, capsys) -> tuple[int, str, str]:
    """visiontune-predict's main() in this process (no second interpreter start): code, out, err."""
    from visiontune.commands import predict

    monkeypatch.chdir(cwd)
    code = predict.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def huge_png(width: int = 13_000, height: int = 13_000) -> bytes:
    """A PNG whose header claims width x height RGB pixels, in a few dozen bytes: what a decoder
    would inflate to width * height * 3 bytes. Its pixel data is cut short; only its size matters."""
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def val_batches(model_name: str, n_batches: int = 3):
    """Random batches of two images at the model's input size, the same on every call."""
    import torch

    size = input_size_for(model_name)
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(2, 3, size, size, generator=generator), torch.tensor([0, 1])) for _ in range(n_batches)
    ]
