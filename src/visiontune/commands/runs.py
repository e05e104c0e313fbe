"""visiontune-runs: runs left RUNNING by processes that died (SIGKILL, out of memory, a lost node).

MLflow cannot tell such a ghost from a run in progress; visiontune tags each run with the host
and process id writing it, so on that host a dead process is found and its run can be marked
FAILED, or resumed from its checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from visiontune import commands


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="visiontune-runs", description=__doc__.splitlines()[0])
    parser.add_argument("--mark-failed", action="store_true", help="mark the dead processes' runs FAILED")
    commands.add_store_option(parser)
    args = parser.parse_args(argv)

    from visiontune import VisiontuneError, store

    uri = commands.store_uri(parser, args)
    try:
        client = store.open_store(uri)
        ghosts = _dead_runs(client)
        for run in ghosts:
            _report(run, client, args.mark_failed)
    except VisiontuneError as err:
        print(f"visiontune-runs: error: {err}", file=sys.stderr)
        return 1
    if not ghosts:
        print("no run is left RUNNING by a dead process")
    return 0


def _dead_runs(client) -> list:
    from visiontune import store

    experiments = [e.experiment_id for e in client.search_experiments()]
    running = client.search_runs(experiments, "attributes.status = 'RUNNING'", max_results=10_000)
    return [r for r in running if store.process_state(r.data.tags.get(store.tags.PROCESS)) == "dead"]


def _report(run, client, mark_failed: bool) -> None:
    from visiontune import store

    run_id, process = run.info.run_id, run.data.tags[store.tags.PROCESS]
    line = f"{run_id} {run.info.run_name}: its process {process} is dead"
    if mark_failed:
        store.mark_failed(client, run_id, f"its process {process} died without reporting")
        line += " -> marked FAILED"
    if store.tags.CHECKPOINT in run.data.tags:
        line += f"; resume with: visiontune-train resume={run_id}"
    print(line)


if __name__ == "__main__":
    sys.exit(main())
