"""What both benchmarks share: the machine they ran on, stand-in weights, and the tutorial's loop."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEED = REPO.parent / "shared" / "reference" / "seed_tutorial.py"
DATA = REPO.parent / "shared" / "hymenoptera_data"


def check_inputs(seed_script: Path, data: Path) -> None:
    """Stop with one line where the tutorial's script or the data set is not where it was looked for
    (the defaults assume a checkout beside ../shared, as the project's own machines have)."""
    for path, flag in ((seed_script, "--seed-script"), (data, "--data")):
        if not path.exists():
            raise SystemExit(
                f"{path} does not exist: pass {flag} PATH (the tutorial's loop, the hymenoptera folder)"
            )


def machine() -> str:
    """CPU, cores, GPU and versions: a figure means little without them."""
    import torch
    import torchvision

    import visiontune

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line
        ]
        cpu = names[0] if names else cpu
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    from visiontune.runtime import cpu_has_bf16

    bf16 = "AVX512-BF16 or AMX" if cpu_has_bf16() else "no native bf16"
    return (
        f"machine: {cpu}, {len(os.sched_getaffinity(0))} cores ({bf16}); {gpu}\n"
        f"versions: python {platform.python_version()}, torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}, visiontune {visiontune.__version__}"
    )


def model_spec(name: str):
    """The shipped spec of model=<name>, as visiontune-train composes it."""
    from hydra import compose, initialize_config_module

    from visiontune import config

    with initialize_config_module(config_module="visiontune.conf", version_base="1.3"):
        return config.model_spec(compose(config_name="train", overrides=[f"model={name}"]).model)


def standin_weights(spec, folder: Path) -> Path:
    """A state dict of a randomly initialised 1000-class model (no network), saved under the
    file name torchvision's weights API caches it as, so model.weights=DEFAULT finds it with
    TORCH_HOME=<folder>/torch_home."""
    import torch
    from torchvision import models

    torch.manual_seed(0)
    url = models.get_model_weights(spec.arch).DEFAULT.url
    path = folder / "torch_home" / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        model = models.get_model(spec.arch, weights=None, **spec.pretrained_kwargs)
        torch.save(model.state_dict(), path)
    return path


@dataclass(frozen=True)
class SeedSettings:
    """What every run of the tutorial's loop in one benchmark shares; the case (model, mode) varies."""

    script: Path
    data: Path
    epochs: int
    workers: int


def run_seed(settings: SeedSettings, model: str, mode: str, weights: Path) -> dict:
    """The tutorial's loop in a process of its own: per-epoch seconds, best val acc, process wall time."""
    feature_extract = "1" if mode == "feature_extract" else "0"
    cmd = [sys.executable, str(settings.script), str(settings.data), model, str(settings.epochs)]
    cmd += [feature_extract, str(weights) if mode != "scratch" else "none", str(settings.workers)]
    tic = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    wall = time.perf_counter() - tic
    line = next(x for x in out.splitlines() if x.startswith("SEED_RESULT "))
    result = json.loads(line.removeprefix("SEED_RESULT "))
    return {"epoch_s": result["epoch_s"], "best": result["best_val_acc"], "wall_s": wall}


def visiontune_env(folder: Path) -> dict:
    """The environment of a user's shell, with the stand-in weights' cache and no MLflow server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return env | {"TORCH_HOME": str(folder / "torch_home")}
