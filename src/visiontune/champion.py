"""A sweep's champion gate: its best child takes the registry alias only if it beats the champion.

Both models are scored on the same held-out images (the data's test split where it has one, else
val) with visiontune-evaluate's scoring; both scores are tagged on their model versions. The
alias moves if the challenger's accuracy exceeds the champion's by more than the margin, or when
forced; the first champion of a name is crowned unopposed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Images the gate scores at once, and with no decoding workers: the gate runs once per sweep, in
# the sweep's own process, after its jobs' workers have gone.
BATCH_SIZE = 32


@dataclass(frozen=True)
class Gate:
    """Where the champion lives and what it takes to replace it (the mlflow.champion_* keys)."""

    name: str  # the registered model
    alias: str
    margin: float = 0.0  # accuracy, 0 to 1
    force: bool = False


@dataclass(frozen=True)
class Verdict:
    """What the gate decided for one challenger."""

    version: str  # the challenger's registered version
    moved: bool  # whether the alias now points at it
    decision: str  # crowned, refused or forced, and why, with both scores
    challenger_acc: float
    champion: str | None = None  # the version the alias pointed at before
    champion_acc: float | None = None


def held_out(data_root: Path) -> Path:
    """The folder the gate scores on: DIR/test when the data has a test split, else DIR (its val/)."""
    test = data_root / "test"
    return test if test.is_dir() and any(p.is_dir() for p in test.iterdir()) else data_root


def crown(uri: str, run_id: str, gate: Gate, data_root: Path) -> Verdict:
    """Register the run's model and move the alias to it if it passes the gate; tags on both versions."""
    from visiontune import scoring, store

    version = store.register_model(uri, run_id, gate.name)
    champion = store.aliased_version(uri, gate.name, gate.alias)
    folder = scoring.labelled_folder(held_out(data_root))
    challenger_acc = accuracy(uri, f"models:/{gate.name}/{version}", folder)
    champion_acc = None
    if champion is not None and champion != version:
        champion_acc = accuracy(uri, f"models:/{gate.name}/{champion}", folder)
    verdict = decide(gate, version, challenger_acc, champion, champion_acc)
    data = {store.tags.GATE_DATA: str(folder.folder)}
    store.tag_version(uri, gate.name, version, {store.tags.GATE_ACCURACY: f"{challenger_acc:.6f}"} | data)
    store.tag_version(uri, gate.name, version, {store.tags.GATE_DECISION: verdict.decision})
    if champion_acc is not None:
        store.tag_version(uri, gate.name, champion, {store.tags.GATE_ACCURACY: f"{champion_acc:.6f}"} | data)
    if verdict.moved:
        store.register_model(uri, run_id, gate.name, gate.alias)  # the version found again: the alias moves
    return verdict


def decide(
    gate: Gate, version: str, challenger_acc: float, champion: str | None, champion_acc: float | None
) -> Verdict:
    """The gate's rule, on the two scores."""
    scores = dict(
        version=version, challenger_acc=challenger_acc, champion=champion, champion_acc=champion_acc
    )
    if champion is None or champion_acc is None:
        return Verdict(moved=True, decision=f"crowned: no {gate.alias} before it", **scores)
    versus = f"accuracy {challenger_acc:.4f} against version {champion}'s {champion_acc:.4f}"
    if challenger_acc > champion_acc + gate.margin:
        return Verdict(moved=True, decision=f"crowned: {versus}, margin {gate.margin}", **scores)
    if gate.force:
        return Verdict(moved=True, decision=f"forced (mlflow.champion_force): {versus}", **scores)
    return Verdict(moved=False, decision=f"refused: {versus}, not more than {gate.margin} better", **scores)


def accuracy(uri: str, model: str, folder) -> float:
    """A logged model's accuracy on a labelled folder, as visiontune-evaluate computes it."""
    from visiontune import flavor, runtime, scoring

    clf = flavor.load(model, uri)
    to_model = scoring.model_indices(folder.classes, clf.classes)
    clf.to(runtime.pick_device("auto"))
    predictions = scoring.predict(clf, folder, to_model, BATCH_SIZE, 0)
    return scoring.score(folder, clf.classes, to_model, predictions).scores.accuracy
