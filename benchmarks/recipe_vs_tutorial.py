"""Best val accuracy of the tutorial's augmentation against recipe=strong, resnet from scratch.

    python benchmarks/recipe_vs_tutorial.py                       # 3 seeds x 30 epochs x 2 cases
    python benchmarks/recipe_vs_tutorial.py --cases strong-nomix,tutorial-adamw  # parts of the recipe
    python benchmarks/recipe_vs_tutorial.py --seeds 1 --epochs 1 model.input_size=64   # a smoke test
    python benchmarks/recipe_vs_tutorial.py --seeds 5 data.gpu_augment=true    # more overrides, both cases

No pretrained weights are reachable here, so the model trains from scratch (mode=scratch): the
setting where augmentation and regularisation matter most, on a data set of 244 training images.
Each run is one `visiontune-train`, launched as a user would, into its case's own store in a
temporary folder; seeds run outermost (seed 1 of every case, then seed 2...), so a measurement
cut short is still a fair comparison. The figure is each run's best_val_acc. The cases:

    tutorial   augment=tutorial (RandomResizedCrop and a flip), sgd, no schedule: the defaults
    strong     recipe=strong (conf/recipe/strong.yaml: TrivialAugment, random erasing 0.25,
               mixup 0.2 / cutmix 1.0, label smoothing 0.1, EMA 0.99, adamw, one-cycle)

and, to see which part of the recipe makes the difference (--cases all, or some by name):

    strong-nomix    recipe=strong without mixup and cutmix
    tutorial-adamw  the tutorial's augmentation with the recipe's adamw and one-cycle schedule
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import DATA, machine, visiontune_env

CASES = {
    "tutorial": [],
    "strong": ["recipe=strong"],
    "strong-nomix": ["recipe=strong", "augment.mixup_alpha=0", "augment.cutmix_alpha=0"],
    "tutorial-adamw": ["optimizer=adamw", "scheduler=onecycle"],
}
MAIN_CASES = ["tutorial", "strong"]


def run_one(args, overrides: list[str], seed: int, workdir: Path) -> tuple[float, float]:
    """(best val accuracy, wall seconds) of one `visiontune-train` run, into the case's own store."""
    from mlflow.tracking import MlflowClient

    command = [sys.executable, "-m", "visiontune.train", "model=resnet", "mode=scratch"]
    command += ["data=imagefolder", f"data.root={args.data.resolve()}", f"epochs={args.epochs}"]
    command += [
        f"seed={seed}",
        "mlflow.log_model=false",
        "checkpoint.every_epochs=0",
        *overrides,
        *args.extra,
    ]
    tic = time.perf_counter()
    result = subprocess.run(command, cwd=workdir, env=visiontune_env(workdir), capture_output=True, text=True)
    wall = time.perf_counter() - tic
    if result.returncode:
        raise SystemExit(f"{' '.join(command[2:])} failed:\n{result.stderr[-3000:]}")
    client = MlflowClient(f"sqlite:///{workdir / 'outputs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("visiontune").experiment_id
    query = f"attributes.status = 'FINISHED' and params.seed = '{seed}'"
    runs = client.search_runs([experiment], query, order_by=["attributes.start_time DESC"], max_results=1)
    if not runs or "best_val_acc" not in runs[0].data.metrics:
        raise SystemExit(f"seed {seed}: no finished run with best_val_acc in {workdir}")
    return runs[0].data.metrics["best_val_acc"], wall


def spread(values: list[float]) -> str:
    """mean ± sample standard deviation, min to max."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}  ({min(values):.4f} to {max(values):.4f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="runs per case, seeds 1 to N")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument(
        "--cases", default=",".join(MAIN_CASES), help=f"comma-separated, of {', '.join(CASES)}; or all"
    )
    parser.add_argument("extra", nargs="*", help="more visiontune overrides for both cases")
    args = parser.parse_args()
    args.cases = list(CASES) if args.cases == "all" else args.cases.split(",")
    if unknown := set(args.cases) - set(CASES):
        raise SystemExit(f"--cases: no case {', '.join(sorted(unknown))}; the cases are {', '.join(CASES)}")
    if not args.data.is_dir():
        raise SystemExit(f"{args.data} does not exist: pass --data PATH (the hymenoptera folder)")

    print(machine())
    print(
        f"settings: resnet mode=scratch, {args.epochs} epochs, seeds 1 to {args.seeds}, {args.data}; "
        f"overrides for both: {' '.join(args.extra) or 'none'}"
    )
    # Seeds outermost, so that a measurement cut short still has every case at the same seeds;
    # each finished run prints its line at once.
    best: dict[str, list[float]] = {name: [] for name in args.cases}
    wall: dict[str, float] = dict.fromkeys(args.cases, 0.0)
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(1, args.seeds + 1):
            for name in args.cases:
                workdir = Path(tmp) / name
                workdir.mkdir(exist_ok=True)
                acc, seconds = run_one(args, CASES[name], seed, workdir)
                best[name].append(acc)
                wall[name] += seconds
                print(f"seed {seed} {name:16s} best_val_acc {acc:.4f}  {seconds / 60:.1f} min", flush=True)
    print(f"{'case':16s}{'best val acc: mean ± sd (min to max)':>44s}{'wall min':>10s}  per seed")
    for name in args.cases:
        per_seed = " ".join(f"{b:.4f}" for b in best[name])
        print(f"{name:16s}{spread(best[name]):>44s}{wall[name] / 60:10.1f}  {per_seed}", flush=True)


if __name__ == "__main__":
    main()
