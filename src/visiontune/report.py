"""Leaderboards and figures over runs in a store: for a sweep's parent and for visiontune-compare.

Reads runs through an MLflow client; writes files only (the store layer logs them).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path

COLUMNS = (
    *("run", "model", "mode", "optimizer", "lr", "status", "best_val_acc", "best_epoch"),
    *("train_seconds", "trainable_params", "run_id", "error"),
)
FIGURE_TITLE = "Validation accuracy vs. number of training epochs"
# Where runs have a test split: its scores with each run's best weights, shown beside best_val_acc.
TEST_COLUMNS = ("test_acc", "test_balanced_acc", "test_macro_f1")
RANKED_BY = (
    "Ranked by best_val_acc (the val split chose each run's best epoch); test_acc, the best weights "
    "scored once on the test split, is shown beside it and not ranked by."
)


def select_runs(client, experiment: str | None = None, parent: str | None = None, run_ids=()) -> list:
    """Runs by experiment name (top-level and nested alike), by parent run id, or by ids."""
    from visiontune import VisiontuneError, store

    if run_ids:
        return [client.get_run(run_id) for run_id in run_ids]
    if parent:
        return store.children_of(client, parent)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise VisiontuneError(f"no experiment named {experiment!r} in this store")
    runs = client.search_runs([found.experiment_id], max_results=10_000)
    # Training runs only: not sweep parents, nor visiontune-evaluate's runs (no best_val_acc).
    return [
        r
        for r in runs
        if r.data.tags.get(store.tags.SWEEP) != "parent" and store.tags.EVALUATES not in r.data.tags
    ]


# A failed run's error in a table cell: its start says what went wrong; the tag keeps the rest.
ERROR_CELL_LIMIT = 120
# Swept keys that the fixed columns already show.
SHOWN_KEYS = {"model", "mode", "optimizer", "optimizer.lr"}


def swept_keys_of(client, runs: Sequence) -> list[str]:
    """Other keys the runs' sweeps varied (batch_size, seed...), from their parents' sweep.varied tags."""
    from mlflow.exceptions import MlflowException

    from visiontune.store import tags

    parents = dict.fromkeys(r.data.tags[tags.PARENT_RUN] for r in runs if tags.PARENT_RUN in r.data.tags)
    keys: dict[str, None] = {}
    for parent in parents:
        try:
            varied = client.get_run(parent).data.tags.get(tags.SWEEP_VARIED, "")
        except MlflowException:  # the parent was deleted: its children still compare
            continue
        keys.update(dict.fromkeys(key for key in varied.split(",") if key and key not in SHOWN_KEYS))
    return list(keys)


def leaderboard(client, runs: Sequence) -> tuple[list[dict], dict[str, list[float]]]:
    """One row per run, best first (failed runs last), and each run's val accuracy per epoch.

    Each key the runs' sweeps varied beyond model, mode, optimizer and lr gets a column after lr.
    Runs on different data are not comparable: a data column then groups them, each group ranked.
    Runs that repeat a configuration (other seeds, other folds) get a `config` column, its rank
    among the configurations by mean, and are listed configuration by configuration.
    """
    from visiontune.store import tags

    extra = swept_keys_of(client, runs)
    rows, curves, parents = [], {}, []
    for run in runs:
        label = _label(run, curves)
        history = client.get_metric_history(run.info.run_id, "val_acc")
        curves[label] = [m.value for m in sorted(history, key=lambda m: m.step)]
        seconds = client.get_metric_history(run.info.run_id, "epoch_seconds")
        rows.append(_row(run, label, extra, seconds))
        # A run outside a sweep, or in one that varied no seed nor fold, repeats no other run.
        alone = run.data.tags.get(tags.PARENT_RUN) is None or not set(REPEAT_KEYS) & set(extra)
        parents.append(run.info.run_id if alone else run.data.tags[tags.PARENT_RUN])
    if not any(row["test_acc"] is not None for row in rows):
        for row in rows:
            for column in TEST_COLUMNS:
                del row[column]
    datasets = {row["data"] for row in rows}
    rows = _ranked(rows, parents)
    if len(datasets) == 1:
        for row in rows:
            del row["data"]
    return rows, {label: values for label, values in curves.items() if values}


def _by_accuracy(row: dict) -> tuple:
    return (row["best_val_acc"] is None, -(row["best_val_acc"] or 0.0), row["run"])


def _ranked(rows: list[dict], parents: list[str]) -> list[dict]:
    """Rows best first within their data; repeats of one configuration (same sweep, same values but
    for the seed and the fold) together, configurations ranked by their mean."""
    members: dict[tuple, list[dict]] = {}
    for row, parent in zip(rows, parents, strict=True):
        members.setdefault((parent, *(row[c] for c in config_columns(row))), []).append(row)
    if all(len(group) == 1 for group in members.values()):
        return sorted(rows, key=lambda r: (r["data"], *_by_accuracy(r)))
    order = sorted(members.values(), key=lambda g: (g[0]["data"], *_by_mean(g), g[0]["run"]))
    ranked = []
    for rank, group in enumerate(order, start=1):
        ranked += [{"config": rank, **row} for row in sorted(group, key=_by_accuracy)]
    return ranked


def _by_mean(group: list[dict]) -> tuple[bool, float]:
    mean = _mean_std([r["best_val_acc"] for r in group])[0]
    return mean is None, -(mean or 0.0)


# --- configurations repeated over seeds (repeats=N) or folds (data.folds=K) ------------------------

# Keys whose values make runs repeats of one configuration rather than configurations of their own.
REPEAT_KEYS = ("seed", "data.fold")
# What a configuration's row averages over its runs (mean and standard deviation of each).
AGGREGATED = ("best_val_acc", "test_acc")
REPEATS_NOTE = "each as mean ± standard deviation over its n finished runs: seeds, folds"
# Columns that are a run's results or its identity, not its configuration.
RESULT_COLUMNS = frozenset(
    ["config", "run", "status", "best_epoch", "train_seconds", "trainable_params", "run_id", "error"]
)


def config_columns(row: Mapping) -> list[str]:
    """The columns of a leaderboard row that say which configuration the run trained."""
    skipped = RESULT_COLUMNS | set(AGGREGATED) | set(TEST_COLUMNS) | set(REPEAT_KEYS)
    return [c for c in row if c not in skipped]


def configurations(rows: Sequence[dict]) -> list[dict]:
    """One row per configuration of a leaderboard whose runs repeat configurations, best mean
    first: its columns, n (finished runs), runs, and the mean and standard deviation of each
    AGGREGATED metric over its finished runs. [] when no configuration has repeats."""
    groups: dict[int, list[dict]] = {}
    for row in rows:
        if "config" in row:
            groups.setdefault(row["config"], []).append(row)
    summaries = []
    for rank, group in sorted(groups.items()):
        finished = [r for r in group if r["status"] == "FINISHED"]
        summary = {"config": rank, **{c: group[0][c] for c in config_columns(group[0])}}
        summary |= {"n": len(finished), "runs": len(group)}
        for metric in AGGREGATED:
            mean, std = _mean_std([r.get(metric) for r in finished])
            summary |= {f"{metric}_mean": mean, f"{metric}_std": std}
        summaries.append(summary)
    return summaries


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation of the values given; std None under two values."""
    import statistics

    known = [v for v in values if v is not None]
    if not known:
        return None, None
    return statistics.fmean(known), statistics.stdev(known) if len(known) > 1 else None


def configurations_markdown(summaries: Sequence[dict]) -> str:
    """The configurations' table, each AGGREGATED metric some run has shown as mean ± std."""
    shown = []
    present = [m for m in AGGREGATED if any(s[f"{m}_mean"] is not None for s in summaries)]
    for summary in summaries:
        row = {k: v for k, v in summary.items() if not k.endswith(("_mean", "_std"))}
        for metric in present:
            mean, std = summary[f"{metric}_mean"], summary[f"{metric}_std"]
            row[metric] = "-" if mean is None else f"{mean:.4f} ± {std or 0.0:.4f}"
        shown.append(row)
    return to_markdown(shown)


def _row(run, label: str, extra: list[str], seconds: list) -> dict:
    from visiontune.store import tags

    params, metrics, tagged = run.data.params, run.data.metrics, run.data.tags
    # A run that failed early has tags but no params yet: its groups' tags (tags.GROUPS, tags.LR)
    # carry the names of the columns.
    return {
        "run": label,
        "model": params.get("model.name", tagged.get("model", "")),
        "mode": params.get("mode.name", tagged.get("mode", "")),
        "data": params.get("data.root", tagged.get("data", "")),
        "optimizer": params.get("optimizer.name", tagged.get("optimizer", "")),
        "lr": params.get("optimizer.lr", tagged.get("lr", "")),
        **{key: params.get(key, tagged.get(key, "")) for key in extra},
        "status": run.info.status,
        "best_val_acc": metrics.get("best_val_acc"),
        **{column: metrics.get(column) for column in TEST_COLUMNS},
        "best_epoch": int(metrics["best_epoch"]) if "best_epoch" in metrics else None,
        "train_seconds": round(sum(m.value for m in seconds), 1) if seconds else None,
        "trainable_params": params.get("trainable_params", ""),
        "run_id": run.info.run_id,
        "error": tagged.get(tags.ERROR, "")[:ERROR_CELL_LIMIT],
    }


def _label(run, taken: dict) -> str:
    name = run.info.run_name or run.info.run_id[:8]
    return name if name not in taken else f"{name} ({run.info.run_id[:6]})"


def to_markdown(rows: Sequence[dict]) -> str:
    shown = list(rows[0] if rows else COLUMNS)
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for row in rows:
        cells = [_cell(row[c], "{:.1f}" if c == "train_seconds" else "{:.4f}") for c in shown]
        lines.append("| " + " | ".join(cells) + " |")
    ranked = f"\n{RANKED_BY}\n" if "test_acc" in shown else ""
    return "\n".join(lines) + "\n" + ranked


def _cell(value, float_format: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return float_format.format(value)
    return str(value).replace("|", "/").replace("\n", " ")


def to_csv(rows: Sequence[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_report(client, runs: Sequence, out_dir: Path) -> list[dict]:
    """leaderboard.csv, leaderboard.md and val_acc_overlay.png in out_dir; returns the rows.

    Where runs repeat configurations, also configurations.csv, and leaderboard.md opens with the
    configurations' table (mean ± std), the runs' table under it.
    """
    rows, curves = leaderboard(client, runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "leaderboard.csv").write_text(to_csv(rows))
    markdown = to_markdown(rows)
    if summaries := configurations(rows):
        (out_dir / "configurations.csv").write_text(to_csv(summaries))
        markdown = (
            f"Configurations, best mean first ({REPEATS_NOTE}):\n\n"
            f"{configurations_markdown(summaries)}\nTheir runs:\n\n{markdown}"
        )
    (out_dir / "leaderboard.md").write_text(markdown)
    figure = accuracy_curves(curves, FIGURE_TITLE)
    figure.savefig(out_dir / "val_acc_overlay.png")
    return rows


def accuracy_curves(curves: Mapping[str, Sequence[float]], title: str):
    """The tutorial's 'Validation Accuracy vs. Number of Training Epochs' figure, any number of lines."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training machines
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for label, values in curves.items():
        epochs = range(1, len(values) + 1)
        ax.plot(epochs, values, marker="o" if len(values) < 30 else None, label=label)
    ax.set_title(title)
    ax.set_xlabel("Training epochs")
    ax.set_ylabel("Validation accuracy")
    ax.set_ylim(0, 1.0)
    longest = max((len(v) for v in curves.values()), default=1)
    ax.set_xticks(range(1, longest + 1, max(1, longest // 15)))
    if curves:  # beside the axes, where it hides no curve however many runs there are
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


# --- an evaluation's figures ----------------------------------------------------------------------
# Built on matplotlib's Figure, not pyplot: nothing is kept in pyplot's registry of open figures,
# so a command can make them in a loop and needs no backend but the PNG writer.


def confusion_matrix(counts: Sequence[Sequence[int]], classes: Sequence[str]):
    """Counts per (true, predicted) class, shaded by the share of the true class's images."""
    import numpy as np
    from matplotlib.figure import Figure

    counts = np.asarray(counts)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    n = len(classes)
    side = min(3.0 + 0.45 * n, 24.0)
    fig = Figure(figsize=(side + 1.5, side), dpi=100)
    ax = fig.subplots()
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="share of the true class's images")
    if n <= 60:  # beyond that the names overlap: the CSV beside the figure has them
        ax.set_xticks(range(n), classes, rotation=45 if n > 3 else 0, ha="right" if n > 3 else "center")
        ax.set_yticks(range(n), classes)
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    ax.set_title(f"Confusion matrix ({counts.sum()} images)")
    if n <= 30:  # beyond that the numbers no longer fit their cells
        for (row, column), count in np.ndenumerate(counts):
            dark = shares[row, column] > 0.5
            ax.text(column, row, str(count), ha="center", va="center", color="white" if dark else "black")
    fig.tight_layout()
    return fig


def confident_mistakes(images: Sequence, captions: Sequence[str], wrong: int):
    """A grid of wrong predictions ((height, width, 3) uint8 arrays, most confident first, each
    captioned with its classes), out of `wrong`; a figure saying so when there are none."""
    from matplotlib.figure import Figure

    if not images:
        fig = Figure(figsize=(5, 2), dpi=100)
        fig.text(0.5, 0.5, "No mistakes: every image was classified correctly.", ha="center", va="center")
        return fig
    columns = min(4, len(images))
    rows = -(-len(images) // columns)
    fig = Figure(figsize=(3.2 * columns, 3.6 * rows + 0.6), dpi=100)
    axes = fig.subplots(rows, columns, squeeze=False).flatten()
    for ax, image, caption in zip(axes, images, captions, strict=False):
        ax.imshow(image)
        ax.set_title(caption, fontsize="small")
    for ax in axes:
        ax.axis("off")
    shown = f"the {len(images)} most confident" if len(images) < wrong else "all"
    fig.suptitle(f"Mistakes: {shown} of {wrong} wrong predictions")
    fig.tight_layout()
    return fig
