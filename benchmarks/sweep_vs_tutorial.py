"""Wall time of a whole visiontune sweep against the tutorial's loop run for each of its jobs.

    python benchmarks/sweep_vs_tutorial.py                        # 6 models x 3 modes x 15 epochs
    python benchmarks/sweep_vs_tutorial.py --models squeezenet resnet --modes feature_extract --epochs 3
    python benchmarks/sweep_vs_tutorial.py hydra/launcher=joblib hydra.launcher.n_jobs=3

visiontune runs the sweep as a user would: one `visiontune-train -m model=... mode=...` with
model.weights=DEFAULT (stand-ins in a TORCH_HOME cache: no network), logging each job's model,
timed from launch to exit. The tutorial's loop is not run for all epochs: each job runs
--seed-epochs epochs in a process of its own, and its estimate is that process's wall time plus
the median of its later epochs for each epoch left. The sum over jobs is the tutorial's estimate.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
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

MODELS = ("resnet", "alexnet", "vgg", "squeezenet", "densenet", "inception")
MODES = ("finetune", "feature_extract", "scratch")


def tutorial_estimate(args, model: str, mode: str, weights: Path) -> float:
    settings = SeedSettings(args.seed_script, args.data, args.seed_epochs, args.workers)
    seed = run_seed(settings, model, mode, weights)
    per_epoch = statistics.median(seed["epoch_s"][1:] or seed["epoch_s"])
    return seed["wall_s"] + (args.epochs - args.seed_epochs) * per_epoch


def run_sweep(args, workdir: Path) -> tuple[float, dict]:
    """(wall seconds of the whole sweep, seconds of each finished job by (model, mode))."""
    from mlflow.tracking import MlflowClient

    overrides = [
        f"model={','.join(args.models)}",
        f"mode={','.join(args.modes)}",
        "data=imagefolder",
        f"data.root={args.data}",
        f"epochs={args.epochs}",
        f"num_workers={args.workers}",
        *args.extra,
    ]
    tic = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "visiontune.train", "-m", *overrides],
        cwd=workdir,
        env=visiontune_env(workdir),
        capture_output=True,
        text=True,
        check=True,
    )
    wall = time.perf_counter() - tic
    client = MlflowClient(f"sqlite:///{workdir / 'outputs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("visiontune").experiment_id], max_results=1000)
    jobs = {
        (r.data.params["model.name"], r.data.params["mode.name"]): (r.info.end_time - r.info.start_time)
        / 1000
        for r in runs
        if "mlflow.parentRunId" in r.data.tags and r.info.status == "FINISHED"
    }
    return wall, jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed-epochs", type=int, default=2, help="epochs the tutorial's loop runs per job")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--seed-script", type=Path, default=SEED, help="the tutorial's loop (baseline)")
    parser.add_argument("extra", nargs="*", help="more visiontune overrides, e.g. hydra/launcher=joblib")
    args = parser.parse_args()
    check_inputs(args.seed_script, args.data)

    print(machine())
    print(
        f"settings: {len(args.models)} models x {len(args.modes)} modes, {args.epochs} epochs, batch 8, "
        f"{args.workers} workers, {args.data}; visiontune overrides: {' '.join(args.extra) or 'none'}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        estimates = {}
        for model in args.models:
            weights = standin_weights(model_spec(model), folder)
            for mode in args.modes:
                estimates[model, mode] = tutorial_estimate(args, model, mode, weights)
        wall, jobs = run_sweep(args, folder)
    print(f"{'job':28s}{'tutorial (estimated) s':>24s}{'visiontune s':>14s}")
    for (model, mode), estimate in estimates.items():
        print(f"{model + ' ' + mode:28s}{estimate:24.1f}{jobs.get((model, mode), float('nan')):14.1f}")
    tutorial = sum(estimates.values())
    print(
        f"whole sweep: tutorial's loop {tutorial / 60:.1f} min (estimated), visiontune {wall / 60:.1f} min "
        f"(launch to exit): x{tutorial / wall:.2f}"
    )


if __name__ == "__main__":
    main()
