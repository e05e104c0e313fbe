"""visiontune-compare: one leaderboard and one accuracy overlay for any set of runs in a store."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from visiontune import commands


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="visiontune-compare",
        description="Leaderboard (CSV, markdown) and val-accuracy overlay (PNG) for runs in an MLflow store.",
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--experiment", help="every training run of this experiment")
    which.add_argument("--parent", help="the children of this sweep's parent run id")
    which.add_argument("--run-ids", nargs="+", metavar="ID", help="these runs")
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNG, CSV and markdown")
    commands.add_store_option(parser)
    args = parser.parse_args(argv)

    from mlflow.exceptions import MlflowException

    from visiontune import VisiontuneError, report, store

    uri = commands.store_uri(parser, args)
    try:
        client = store.open_store(uri)
        runs = report.select_runs(client, args.experiment, args.parent, args.run_ids or ())
        if not runs:
            raise VisiontuneError("no runs matched: check the experiment name, parent id or run ids")
        rows = report.write_report(client, runs, args.out)
    except (VisiontuneError, MlflowException) as err:
        print(f"visiontune-compare: error: {err}", file=sys.stderr)
        return 1
    print((args.out / "leaderboard.md").read_text())  # with the configurations' means, where runs repeat
    made = "leaderboard.md, configurations.csv" if report.configurations(rows) else "leaderboard.md"
    print(f"wrote {args.out / 'leaderboard.csv'}, {made} and val_acc_overlay.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
