"""Epoch time of visiontune against the tutorial's loop, measured in the same run.

    python benchmarks/seed_vs_visiontune.py --model squeezenet --mode feature_extract --epochs 3

Runs ../shared/reference/seed_tutorial.py and visiontune-train on the same data, model,
weights, epochs, batch size and worker count, one after the other, and prints each one's
per-epoch seconds and the ratio seed / visiontune (above 1: visiontune is faster). The first
epoch is reported apart: it carries worker start-up and allocator warm-up in both.
Weights are stand-ins saved from a randomly initialised model (no network), so accuracies
are printed for completeness, not compared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from visiontune import config

REPO = Path(__file__).resolve().parents[1]
SEED = REPO.parent / "shared" / "reference" / "seed_tutorial.py"
DATA = REPO.parent / "shared" / "hymenoptera_data"


def model_spec(name: str):
    """The shipped spec of model=<name>, as visiontune-train composes it."""
    from hydra import compose, initialize_config_module

    from visiontune import config

    with initialize_config_module(config_module="visiontune.conf", version_base="1.3"):
        return config.model_spec(compose(config_name="train", overrides=[f"model={name}"]).model)


def standin_weights(spec, folder: Path) -> Path:
    import torch
    from torchvision import models

    torch.manual_seed(0)
    path = folder / f"{spec.arch}.pth"
    model = models.get_model(spec.arch, weights=None, **spec.pretrained_kwargs)
    torch.save(model.state_dict(), path)
    return path


def run_seed(args, weights: Path) -> dict:
    feature_extract = "1" if args.mode == "feature_extract" else "0"
    cmd = [sys.executable, str(args.seed_script), str(args.data), args.model, str(args.epochs)]
    cmd += [feature_extract, str(weights) if args.mode != "scratch" else "none", str(args.workers)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("SEED_RESULT "))
    result = json.loads(line.removeprefix("SEED_RESULT "))
    return {"epoch_s": result["epoch_s"], "best": result["best_val_acc"]}


def run_visiontune(args, weights: Path, workdir: Path) -> dict:
    from mlflow.tracking import MlflowClient

    overrides = {
        "model": args.model,
        "mode": args.mode,
        "data.root": args.data,
        "data": "imagefolder",
        "epochs": args.epochs,
        "batch_size": 8,
        "num_workers": args.workers,
        "model.weights": weights,
        "mlflow.log_model": "false",
    }
    cmd = [sys.executable, "-m", "visiontune.cli", *(f"{k}={v}" for k, v in overrides.items()), *args.extra]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, check=True)
    client = MlflowClient(f"sqlite:///{workdir / 'outputs' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("visiontune").experiment_id])
    history = sorted(client.get_metric_history(run.info.run_id, "epoch_seconds"), key=lambda m: m.step)
    return {"epoch_s": [m.value for m in history], "best": run.data.metrics["best_val_acc"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="squeezenet", choices=config.model_names())
    parser.add_argument(
        "--mode", default="feature_extract", choices=["finetune", "feature_extract", "scratch"]
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--seed-script", type=Path, default=SEED, help="the tutorial's loop (baseline)")
    parser.add_argument("extra", nargs="*", help="more visiontune overrides, e.g. precision=bf16")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        weights = standin_weights(model_spec(args.model), Path(tmp))
        seed = run_seed(args, weights)
        ours = run_visiontune(args, weights, Path(tmp))

    print(f"{args.model} {args.mode}, {args.epochs} epochs, batch 8, {args.workers} workers, {args.data}")
    print(f"{'':14s}{'epoch 1 s':>10s}{'later epochs s (median)':>26s}{'best val acc':>14s}")
    for name, r in (("seed tutorial", seed), ("visiontune", ours)):
        later = statistics.median(r["epoch_s"][1:]) if len(r["epoch_s"]) > 1 else float("nan")
        print(f"{name:14s}{r['epoch_s'][0]:10.2f}{later:26.2f}{r['best']:14.4f}")
    first = seed["epoch_s"][0] / ours["epoch_s"][0]
    later = statistics.median(seed["epoch_s"][1:]) / statistics.median(ours["epoch_s"][1:])
    total = sum(seed["epoch_s"]) / sum(ours["epoch_s"])
    print(
        f"speed-up (seed / visiontune): epoch 1 x{first:.2f}, later epochs x{later:.2f}, all epochs x{total:.2f}"
    )


if __name__ == "__main__":
    main()
