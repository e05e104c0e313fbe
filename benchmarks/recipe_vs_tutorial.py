"""Best val accuracy of the tutorial's augmentation against recipe=strong, resnet from scratch.

    python benchmarks/recipe_vs_tutorial.py                       # 3 seeds x 30 epochs x 2 cases
    python benchmarks/recipe_vs_tutorial.py --seeds 1 --epochs 1 model.input_size=64   # a smoke test
    python benchmarks/recipe_vs_tutorial.py --seeds 5 data.gpu_augment=true    # more overrides, both cases

No pretrained weights are reachable here, so the model trains from scratch (mode=scratch): the
setting where augmentation and regularisation matter most, on a data set of 244 training images.
Each case is one `visiontune-train -m seed=1,...,N` sweep, launched as a user would, into a
store of its own in a temporary folder; the figure is each child run's best_val_acc. The cases:

    tutorial   augment=tutorial (RandomResizedCrop and a flip), sgd, no schedule: the defaults
    strong     recipe=strong (conf/recipe/strong.yaml: TrivialAugment, random erasing 0.25,
               mixup 0.2 / cutmix 1.0, label smoothing 0.1, adamw, one-cycle)
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

CASES = {"tutorial": [], "strong": ["recipe=strong"]}


def run_case(args, overrides: list[str], workdir: Path) -> tuple[list[float], float]:
    """(each seed's best val accuracy, wall seconds of the sweep) for one case."""
    from mlflow.tracking import MlflowClient

    seeds = ",".join(str(s) for s in range(1, args.seeds + 1))
    command = [sys.executable, "-m", "visiontune.train", "-m", "model=resnet", "mode=scratch"]
    command += ["data=imagefolder", f"data.root={args.data.resolve()}", f"epochs={args.epochs}"]
    command += [
        f"seed={seeds}",
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
    runs = client.search_runs([experiment], "attributes.status = 'FINISHED'", max_results=1000)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags and "best_val_acc" in r.data.metrics]
    children.sort(key=lambda r: int(r.data.params["seed"]))
    best = [r.data.metrics["best_val_acc"] for r in children]
    if len(best) != args.seeds:
        raise SystemExit(f"expected {args.seeds} finished runs with best_val_acc, found {len(best)}")
    return best, wall


def spread(values: list[float]) -> str:
    """mean ± sample standard deviation, min to max."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}  ({min(values):.4f} to {max(values):.4f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="runs per case, seeds 1 to N")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("extra", nargs="*", help="more visiontune overrides for both cases")
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"{args.data} does not exist: pass --data PATH (the hymenoptera folder)")

    print(machine())
    print(
        f"settings: resnet mode=scratch, {args.epochs} epochs, seeds 1 to {args.seeds}, {args.data}; "
        f"overrides for both: {' '.join(args.extra) or 'none'}"
    )
    print(f"{'case':10s}{'best val acc: mean ± sd (min to max)':>44s}{'wall min':>10s}  per seed")
    for name in args.cases:
        with tempfile.TemporaryDirectory() as tmp:
            best, wall = run_case(args, CASES[name], Path(tmp))
        per_seed = " ".join(f"{b:.4f}" for b in best)
        print(f"{name:10s}{spread(best):>44s}{wall / 60:10.1f}  {per_seed}", flush=True)


if __name__ == "__main__":
    main()
