"""Epoch time of visiontune against the tutorial's loop, measured in the same run.

    python benchmarks/seed_vs_visiontune.py                      # the three cases below, 3 epochs
    python benchmarks/seed_vs_visiontune.py --case resnet:finetune --epochs 5 precision=off

For each case (model:mode; default squeezenet feature extraction, resnet and inception
fine-tuning) runs ../shared/reference/seed_tutorial.py and visiontune-train on the same data,
model, weights, epochs, batch size (8) and worker count, one after the other, and prints each
one's per-epoch seconds, best val accuracy and the ratio tutorial / visiontune (above 1:
visiontune is faster). The first epoch is reported apart: it carries worker start-up and
allocator warm-up in both, and visiontune's decoding of the training split once. Weights are
stand-ins saved from a randomly initialised model (no network), so accuracies are close to
chance and printed to show both learn alike, not to rank them.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import (
    DATA,
    SEED,
    SeedSettings,
    check_inputs,
    machine,
    model_spec,
    run_seed,
    standin_weights,
    visiontune_env,
)

CASES = ("squeezenet:feature_extract", "resnet:finetune", "inception:finetune")


def run_visiontune(args, model: str, mode: str, weights: Path, workdir: Path) -> dict:
    from mlflow.tracking import MlflowClient

    overrides = {
        "model": model,
        "mode": mode,
        "data": "imagefolder",
        "data.root": args.data,
        "epochs": args.epochs,
        "batch_size": 8,
        "num_workers": args.workers,
        "model.weights": weights,
        "mlflow.log_model": "false",
    }
    cmd = [sys.executable, "-m", "visiontune.train", *(f"{k}={v}" for k, v in overrides.items()), *args.extra]
    workdir.mkdir()
    subprocess.run(cmd, cwd=workdir, env=visiontune_env(workdir), capture_output=True, text=True, check=True)
    client = MlflowClient(f"sqlite:///{workdir / 'outputs' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("visiontune").experiment_id])
    history = sorted(client.get_metric_history(run.info.run_id, "epoch_seconds"), key=lambda m: m.step)
    return {"epoch_s": [m.value for m in history], "best": run.data.metrics["best_val_acc"]}


def later(epoch_s: list[float]) -> float:
    return statistics.median(epoch_s[1:]) if len(epoch_s) > 1 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--case", action="append", help=f"model:mode, repeatable (default: {', '.join(CASES)})"
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--seed-script", type=Path, default=SEED, help="the tutorial's loop (baseline)")
    parser.add_argument("extra", nargs="*", help="more visiontune overrides, e.g. precision=off")
    args = parser.parse_args()
    check_inputs(args.seed_script, args.data)
    cases = [case.split(":") for case in args.case or CASES]

    print(machine())
    print(
        f"settings: {args.epochs} epochs, batch 8, {args.workers} workers, {args.data}, "
        f"visiontune overrides: {' '.join(args.extra) or 'none (defaults)'}"
    )
    print(
        f"{'case':28s}{'':14s}{'epoch 1 s':>10s}{'later s':>9s}{'best acc':>10s}{'  speed-up later (all)':>18s}"
    )
    settings = SeedSettings(args.seed_script, args.data, args.epochs, args.workers)
    with tempfile.TemporaryDirectory() as tmp:
        for i, (model, mode) in enumerate(cases):
            weights = standin_weights(model_spec(model), Path(tmp))
            seed = run_seed(settings, model, mode, weights)
            ours = run_visiontune(args, model, mode, weights, Path(tmp) / str(i))
            ratio = later(seed["epoch_s"]) / later(ours["epoch_s"])
            total = sum(seed["epoch_s"]) / sum(ours["epoch_s"])
            for name, r in (("tutorial", seed), ("visiontune", ours)):
                label = f"{model} {mode}" if name == "tutorial" else ""
                line = (
                    f"{label:28s}{name:14s}{r['epoch_s'][0]:10.2f}{later(r['epoch_s']):9.2f}{r['best']:10.4f}"
                )
                print(line + (f"   x{ratio:.2f} (x{total:.2f})" if name == "visiontune" else ""), flush=True)


if __name__ == "__main__":
    main()
