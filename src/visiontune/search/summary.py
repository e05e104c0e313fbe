"""A study's summary on its MLflow parent run: the leaderboard, the accuracy overlay, Optuna's plots."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from visiontune import report, store
from visiontune.store import tags

log = logging.getLogger("visiontune")

PLOTS = {
    "optimization_history.png": "plot_optimization_history",
    "param_importances.png": "plot_param_importances",
    "parallel_coordinate.png": "plot_parallel_coordinate",
}


def summarise(opened, parent: store.ParentRun) -> str:
    """Write the report on `parent` and end it FINISHED; returns the leaderboard (Markdown)."""
    client = store.open_store(parent.uri)
    children = report.select_runs(client, parent=parent.run_id)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows = report.write_report(client, children, folder)
        write_plots(opened, folder / "optuna")
        (folder / "optuna" / "trials.csv").write_text(trials_table(opened))
        parent.record(folder, *summary(opened, rows))
        board = (folder / "leaderboard.md").read_text()
    parent.end("FINISHED")
    return board


def write_plots(opened, folder: Path) -> None:
    """Optuna's optimisation history, parameter importances and parallel coordinates, as PNG files."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import optuna.visualization.matplotlib as plots
    from matplotlib import pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    for name, function in PLOTS.items():
        try:
            with warnings.catch_warnings():  # "experimental" since optuna 2.2; equal importances
                warnings.simplefilter("ignore")
                axes = getattr(plots, function)(opened)
        except (ValueError, RuntimeError) as err:  # e.g. importances need two completed trials
            log.info("optuna plot %s left out: %s", name, err)
            continue
        figure = axes.ravel()[0].figure if hasattr(axes, "ravel") else axes.figure
        figure.set_size_inches(9, 5.5)
        figure.tight_layout()
        figure.savefig(folder / name, dpi=100)
        plt.close(figure)


def trials_table(opened) -> str:
    """Every trial: number, state, value, its values and its MLflow run (CSV)."""
    import csv
    import io

    from visiontune.search.study import RUN_ID

    trials = opened.get_trials(deepcopy=False)
    keys = sorted({k for t in trials for k in t.params})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["trial", "state", "value", *keys, "run_id"])
    for t in trials:
        values = [t.params.get(k, "") for k in keys]
        writer.writerow([t.number, t.state.name, t.value, *values, t.user_attrs.get(RUN_ID, "")])
    return buffer.getvalue()


def summary(opened, rows: list[dict]) -> tuple[dict[str, str], dict[str, float]]:
    """The parent's tags and metrics: children, failed, pruned, the best trial and its run."""
    from optuna.trial import TrialState

    states = [t.state for t in opened.get_trials(deepcopy=False)]
    failed = [r for r in rows if r["status"] != "FINISHED"]
    marks = {tags.SWEEP_CHILDREN: str(len(rows)), tags.SWEEP_FAILED: str(len(failed))}
    marks["optuna.pruned"] = str(states.count(TrialState.PRUNED))
    metrics = {}
    if TrialState.COMPLETE in states:
        best = opened.best_trial
        metrics["best_val_acc"] = best.value
        marks["optuna.best_trial"] = str(best.number)
        run_id = best.user_attrs.get("mlflow.run_id")
        if run_id:
            marks[tags.BEST_CHILD_RUN_ID] = run_id
    return marks, metrics
