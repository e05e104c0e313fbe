"""A logged model scored on a labelled folder: the folder read, predictions, accuracy, per-class scores.

What visiontune-evaluate reports and what a sweep's champion gate compares: one scoring, in the
library, so that the gate scores exactly as the command does.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from visiontune.classifier import Classifier


# --- the folder and the model's classes ------------------------------------------------------------


@dataclass(frozen=True)
class LabelledFolder:
    """A labelled folder: DIR as given, where its class folders are (DIR/val or DIR), its samples."""

    root: Path
    folder: Path
    classes: list[str]
    samples: list[tuple[str, int]]  # (path, index into classes)


def labelled_folder(root: Path) -> LabelledFolder:
    """DIR/val/<class>/ where DIR has a val/ of class folders, else DIR/<class>/; images found as
    training finds them."""
    from visiontune import VisiontuneError, data

    if not root.is_dir():
        raise VisiontuneError(
            f"--data {root} is not a folder: give a folder of class folders (DIR/<class>/*.jpg), "
            f"or a dataset folder whose val/ holds them"
        )
    root = root.resolve()
    try:
        folder, classes = root / "val", data.class_folders(root, "val")
    except VisiontuneError:  # no val/ of class folders: DIR itself holds them
        folder, classes = root, data.class_folders(root.parent, root.name)
    samples = [(str(p), label) for label, name in enumerate(classes) for p in data.image_files(folder / name)]
    if not samples:
        raise VisiontuneError(
            f"{folder} has class folders {classes} but no images in them "
            f"(extensions {', '.join(data.IMG_EXTENSIONS)})"
        )
    return LabelledFolder(root, folder, classes, samples)


def model_indices(folder_classes: Sequence[str], model_classes: Sequence[str]) -> list[int]:
    """Each folder class's index among the model's classes, matched by name."""
    from visiontune import VisiontuneError

    unknown = [name for name in folder_classes if name not in model_classes]
    if unknown:
        raise VisiontuneError(
            f"the folder has classes the model does not know: {unknown}; the model's classes are "
            f"{list(model_classes)}. Remove or rename those class folders, or evaluate a model "
            f"trained on them."
        )
    return [list(model_classes).index(name) for name in folder_classes]


# --- predicting and scoring ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Predictions:
    """What the model said about the images that decoded."""

    rows: torch.Tensor  # (N,) indices into the folder's samples
    targets: torch.Tensor  # (N,) the true classes, as model class indices
    probabilities: torch.Tensor  # (N, model classes)
    skipped: int  # images that did not decode
    # (N, model classes) averaged over the test-time views, with --tta
    tta_probabilities: torch.Tensor | None = None

    @property
    def top(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each image's highest probability, and its class: what the model predicts."""
        return self.probabilities.max(dim=1)


def predict(
    clf: Classifier,
    folder: LabelledFolder,
    to_model: list[int],
    batch_size: int,
    workers: int,
    tta: bool = False,
) -> Predictions:
    """The model's probabilities for every image that decodes, with its true class; with tta also
    averaged over the test-time views, from the same decoded batches."""
    import torch

    from visiontune import VisiontuneError, classifier

    paths = [path for path, _ in folder.samples]
    rows, views = [torch.empty(0, dtype=torch.long)], [torch.empty(2 if tta else 1, 0, len(clf.classes))]
    score = functools.partial(clf.view_probabilities, tta=tta)
    for batch_rows, batch_views in classifier.classify_files(clf, paths, batch_size, workers, score):
        rows.append(batch_rows)
        views.append(batch_views)
    decoded, views = torch.cat(rows), torch.cat(views, dim=1)
    if not len(decoded):
        raise VisiontuneError(f"none of the {len(paths)} images in {folder.folder} decodes")
    labels = torch.tensor([label for _, label in folder.samples])
    targets = torch.tensor(to_model)[labels[decoded]]
    averaged = views.mean(0) if tta else None
    return Predictions(decoded, targets, views[0], len(paths) - len(decoded), averaged)


@dataclass(frozen=True)
class Scores:
    """Classification scores over C classes; a per-class value is NaN where it is undefined."""

    confusion: torch.Tensor  # (C, C) counts, rows true, columns predicted
    accuracy: float
    precision: torch.Tensor  # (C,) NaN where the class was never predicted
    recall: torch.Tensor  # (C,) NaN where the class has no images
    f1: torch.Tensor  # (C,) NaN where the class has no images; 0 where none of them is found
    support: torch.Tensor  # (C,) images of each class
    macro_f1: float  # the mean F1 over the classes that have images
    balanced_accuracy: float = float("nan")  # the mean recall over the classes that have images


def scores(targets: torch.Tensor, predicted: torch.Tensor, num_classes: int) -> Scores:
    """Accuracy, per-class precision, recall, F1 and support, macro F1 and the confusion matrix."""
    import torch

    confusion = torch.bincount(targets * num_classes + predicted, minlength=num_classes**2)
    confusion = confusion.view(num_classes, num_classes)
    hits = confusion.diag().double()
    support, predictions = confusion.sum(dim=1), confusion.sum(dim=0)
    present = support > 0
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    # F1 as 2 TP / (2 TP + FP + FN): the harmonic mean of precision and recall where both are
    # defined, and 0 for a class with images none of which was found.
    f1 = torch.where(present, 2 * hits / (support + predictions).clamp(min=1), nan)
    return Scores(
        confusion=confusion,
        accuracy=(hits.sum() / support.sum()).item(),
        precision=torch.where(predictions > 0, hits / predictions.clamp(min=1), nan),
        recall=torch.where(present, hits / support.clamp(min=1), nan),
        f1=f1,
        support=support,
        macro_f1=f1[present].mean().item(),
        balanced_accuracy=(hits / support.clamp(min=1))[present].mean().item(),
    )


@dataclass(frozen=True)
class Evaluation:
    """A model's predictions on a folder and their scores, as the table, files and metrics show them."""

    folder: LabelledFolder
    classes: list[str]  # the model's
    predictions: Predictions
    scores: Scores
    # The model classes shown: the folder's, and any other the model predicted (a false positive
    # each time). Together they hold every count of the confusion matrix.
    shown: list[int]


def score(
    folder: LabelledFolder, classes: list[str], to_model: list[int], predictions: Predictions
) -> Evaluation:
    """The predictions scored over the model's classes."""
    import torch

    result = scores(predictions.targets, predictions.top[1], len(classes))
    predicted = torch.nonzero(result.confusion.sum(dim=0)).flatten().tolist()
    return Evaluation(folder, classes, predictions, result, sorted(set(to_model) | set(predicted)))


def metric_keys(classes: Sequence[str]) -> list[str]:
    """Class names as parts of MLflow metric keys (letters, digits, _ - . / and spaces), each distinct."""
    keys: list[str] = []
    for name in classes:
        key = re.sub(r"[^\w\-./ ]", "_", name)
        while key in keys:  # "a+b" and "a?b" would both be "a_b"
            key += "_"
        keys.append(key)
    return keys


def eval_metrics(evaluation: Evaluation) -> dict[str, float]:
    """eval_accuracy, eval_macro_f1, and each shown class's precision, recall and F1 where defined."""
    result, keys = evaluation.scores, metric_keys(evaluation.classes)
    metrics = {"eval_accuracy": result.accuracy, "eval_macro_f1": result.macro_f1}
    metrics["eval_balanced_accuracy"] = result.balanced_accuracy
    for which in ("precision", "recall", "f1"):
        values = getattr(result, which)
        for i in evaluation.shown:
            if not values[i].isnan():
                metrics[f"eval_{which}_{keys[i]}"] = values[i].item()
    return metrics


def tta_scores(evaluation: Evaluation) -> Scores | None:
    """The scores of the TTA-averaged probabilities (--tta); None without."""
    averaged = evaluation.predictions.tta_probabilities
    if averaged is None:
        return None
    return scores(evaluation.predictions.targets, averaged.argmax(dim=1), len(evaluation.classes))


def tta_metrics(evaluation: Evaluation) -> dict[str, float]:
    """eval_accuracy_tta and eval_macro_f1_tta with --tta; nothing without."""
    result = tta_scores(evaluation)
    return (
        {} if result is None else {"eval_accuracy_tta": result.accuracy, "eval_macro_f1_tta": result.macro_f1}
    )
