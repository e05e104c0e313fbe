"""Matplotlib figures: validation accuracy per epoch, one line per run."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


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
    if curves:
        ax.legend(fontsize="small", loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
