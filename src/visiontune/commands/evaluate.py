"""visiontune-evaluate: score a logged model on a labelled image folder, recorded as an MLflow run.

    visiontune-evaluate <run id> --data hymenoptera_data --out eval/

The folder's class folders (DIR/val/<class>/ where DIR has a val/ of class folders, else
DIR/<class>/) are matched to the model's classes by name. The evaluation run sits beside the
model's training run: accuracy, per-class precision, recall and F1 (in MLflow 3 also the logged
model's metrics), a confusion matrix and the model's most confident mistakes.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from visiontune import commands

# The folder, predicting and scoring live in the library: a sweep's champion gate scores models
# exactly as this command does. metric_keys and scores stay reachable here for callers.
from visiontune.scoring import (  # noqa: F401
    Evaluation,
    LabelledFolder,
    eval_metrics,
    labelled_folder,
    metric_keys,
    model_indices,
    predict,
    score,
    scores,
    tta_metrics,
    tta_scores,
)

if TYPE_CHECKING:
    import torch

    from visiontune.classifier import Classifier

PROG = "visiontune-evaluate"
DEFAULT_EXPERIMENT = "visiontune"
MISTAKES_SHOWN = 16
UI_BASE = "http://127.0.0.1:5000"  # where visiontune-ui serves by default
UNDEFINED_NOTE = (
    "(- : undefined. precision: the model never predicted the class; "
    "recall and f1: the folder has no images of it)"
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = _parse(parser, argv)

    from mlflow.exceptions import MlflowException

    from visiontune import VisiontuneError, user_message

    try:
        if args.data.suffix.lower() == ".csv":  # a multi-label model's labels: a CSV
            text = evaluate_table(args, commands.model_store_uri(parser, args))
        else:
            text = evaluate(args, labelled_folder(args.data), commands.model_store_uri(parser, args))
    except (VisiontuneError, MlflowException, OSError) as err:  # OSError: an --out folder we cannot write
        print(f"{PROG}: error: {user_message(err).splitlines()[0]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted (an evaluation run that had started is recorded KILLED)", file=sys.stderr)
        return 130
    print(text)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Score a logged model on a labelled image folder, recorded as an MLflow run."
    )
    commands.add_model_argument(parser)
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        metavar="DIR",
        help="labelled images: DIR/val/<class>/ where DIR has a val/ of class folders, else DIR/<class>/; "
        "for a multi-label model a CSV of path,label rows (labels divided by --label-delim)",
    )
    parser.add_argument("--label-delim", default="|", help="a CSV's multi-label separator (default |)")
    parser.add_argument(
        "--image-root", type=Path, help="a CSV's image paths are relative to this (default: its folder)"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--num-workers", type=int, default=min(4, os.cpu_count() or 1), help="decoding processes"
    )
    parser.add_argument(
        "--device", default="auto", help="auto (a GPU if there is one), cpu, cuda, cuda:1, ..."
    )
    parser.add_argument(
        "--experiment",
        help="where to record the run (default: the training run's experiment, else visiontune)",
    )
    parser.add_argument("--out", type=Path, help="also write the figures and CSV files to this folder")
    parser.add_argument(
        "--tta",
        action="store_true",
        help="also score with test-time augmentation (each image and its mirror, probabilities averaged) "
        "and report both accuracies",
    )
    commands.add_store_option(parser, "read the model from and record the evaluation in")
    return parser


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """The arguments, refused before any model loads where a number is out of range."""
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.num_workers < 0:
        parser.error("--batch-size takes 1 or more, --num-workers 0 or more")
    # data.ImageFiles reports each image that does not decode in a warning line.
    logging.basicConfig(format=f"{PROG}: %(levelname)s: %(message)s", level=logging.WARNING)
    return args


def per_class_rows(evaluation: Evaluation) -> list[dict]:
    """One row per shown class; None where a score is undefined."""
    result = evaluation.scores

    def value(tensor: torch.Tensor, i: int) -> float | None:
        return None if tensor[i].isnan() else tensor[i].item()

    return [
        {
            "class": evaluation.classes[i],
            "precision": value(result.precision, i),
            "recall": value(result.recall, i),
            "f1": value(result.f1, i),
            "support": int(result.support[i]),
        }
        for i in evaluation.shown
    ]


# --- the evaluation run -----------------------------------------------------------------------------------


def evaluate(args: argparse.Namespace, folder: LabelledFolder, uri: str) -> str:
    """Load the model, score it on the folder in an MLflow run; the text to print."""
    from visiontune import VisiontuneError, flavor, runtime, store

    clf = flavor.load(args.model, uri)
    if clf.multilabel:
        raise VisiontuneError(
            f"{args.model} is a multi-label model: give --data a CSV of path,label rows (labels divided "
            f"by {args.label_delim!r}), not a folder of class folders"
        )
    to_model = model_indices(folder.classes, clf.classes)  # refused before any run exists
    clf.to(runtime.pick_device(args.device))
    experiment_id, source_here = evaluation_experiment(uri, clf.run_id, args.experiment)
    given = model_reference(args.model)
    with store.tracked_run(uri, run_start(experiment_id, given, folder, clf)) as run:
        store.log_params(
            {
                "data": folder.folder,
                "images": len(folder.samples),
                "batch_size": args.batch_size,
                "tta": args.tta,
            }
        )
        predictions = predict(clf, folder, to_model, args.batch_size, args.num_workers, args.tta)
        evaluation = score(folder, clf.classes, to_model, predictions)
        store.log_params({"skipped_images": predictions.skipped})
        # Linked to the logged model only where it lives in this store (not a folder from elsewhere).
        metrics = eval_metrics(evaluation) | tta_metrics(evaluation)
        store.log_metrics(metrics, model_id=clf.model_id if source_here else None)
        record_files(evaluation, args.out)
        lines = summary(evaluation)
        store.set_tags({store.tags.NOTE: f"Evaluation of {given}:\n\n" + "\n\n".join(lines[:2])})
    return "\n".join([*lines, where_to_see(args.tracking_uri, uri, experiment_id, run.info.run_id)])


def evaluate_table(args: argparse.Namespace, uri: str) -> str:
    """A multi-label model scored on a CSV in an MLflow run: mAP, micro and macro F1 at the
    threshold its training run set (predict.threshold); the text to print."""
    import torch

    from visiontune import VisiontuneError, classifier, flavor, runtime, store, tasks
    from visiontune.data import table

    clf = flavor.load(args.model, uri)
    if not clf.multilabel:
        raise VisiontuneError(f"{args.model} is a single-label model: give --data a folder of class folders")
    rows = table.read_rows(
        args.data, args.image_root or args.data.parent, table.Columns(delimiter=args.label_delim)
    )
    index = {name: i for i, name in enumerate(clf.classes)}
    if unknown := sorted({label for _, labels in rows for label in labels} - set(index)):
        raise VisiontuneError(f"{args.data}: labels the model does not know: {unknown[:5]}")
    targets = torch.stack([data_rows(labels, index) for _, labels in rows])
    clf.to(runtime.pick_device(args.device))
    experiment_id, _ = evaluation_experiment(uri, clf.run_id, args.experiment)
    folder = LabelledFolder(args.data.resolve(), args.data.resolve().parent, clf.classes, [])
    with store.tracked_run(uri, run_start(experiment_id, model_reference(args.model), folder, clf)) as run:
        store.log_params({"data": str(args.data), "images": len(rows), "batch_size": args.batch_size})
        found, probabilities = [], []
        for indices, chunk in classifier.classify_files(
            clf, [p for p, _ in rows], args.batch_size, args.num_workers
        ):
            found += indices.tolist()
            probabilities.append(chunk)
        metrics = tasks.multilabel_metrics(torch.cat(probabilities), targets[found], clf.threshold)
        store.log_metrics({f"eval_{key}": value for key, value in metrics.items()})
    lines = [f"{key}  {value:.4f}" for key, value in metrics.items()]
    unreadable = len(rows) - len(found)
    lines.append(f"({len(found)} images of {args.data}, {unreadable} unreadable; threshold {clf.threshold})")
    return "\n".join([*lines, where_to_see(args.tracking_uri, uri, experiment_id, run.info.run_id)])


def data_rows(labels: Sequence[str], index: dict[str, int]):
    """One image's labels as a multi-hot row over the model's classes."""
    from visiontune.data.loaders import multi_hot

    return multi_hot([index[label] for label in labels], len(index))


def evaluation_experiment(uri: str, source_run_id: str, name: str | None) -> tuple[str, bool]:
    """The experiment to record in (the one named, else the training run's, else visiontune),
    and whether the training run is in this store."""
    from mlflow.exceptions import MlflowException

    from visiontune import store

    source = None
    if source_run_id:
        with contextlib.suppress(MlflowException):  # a model folder that came from another store
            source = store.open_store(uri).get_run(source_run_id)
    if name:
        return store.ensure_experiment(uri, name), source is not None
    if source is not None:
        return source.info.experiment_id, True
    return store.ensure_experiment(uri, DEFAULT_EXPERIMENT), False


def model_reference(given: str) -> str:
    """The model as the run records it: a URI, or a model folder's absolute path."""
    from visiontune import flavor

    uri = flavor.model_uri(given)
    return str(Path(uri).resolve()) if Path(uri).is_dir() else uri


def run_start(experiment_id: str, given: str, folder: LabelledFolder, clf: Classifier):
    """evaluate-<model>-<folder>, tagged with what it scores, on what, and which run trained it."""
    from visiontune import store

    tags = store.tags
    marks = {tags.EVALUATES: given, tags.DATA: str(folder.root), tags.PROCESS: store.this_process()}
    marks |= {tags.SOURCE_RUN: clf.run_id} if clf.run_id else {}
    marks |= {tags.MODEL_ID: clf.model_id} if clf.model_id else {}
    marks |= {"model": clf.model} if clf.model else {}
    return store.RunStart(experiment_id, f"evaluate-{short_name(given)}-{folder.root.name}", marks)


def short_name(model: str) -> str:
    """A model as a run name shows it: a run id's first 8 characters, name-v3, name@alias, a folder."""
    if model.startswith("runs:/"):
        return model.removeprefix("runs:/").split("/")[0][:8]
    if model.startswith("models:/"):
        return model.removeprefix("models:/").replace("/", "-v")
    return Path(model).name


def record_files(evaluation: Evaluation, out: Path | None) -> None:
    """The figures and CSV files as artifacts of the active run, and in `out` where given."""
    from visiontune import store

    with contextlib.ExitStack() as stack:
        folder = out or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        folder.mkdir(parents=True, exist_ok=True)
        for path in write_files(evaluation, folder):
            store.log_files(path, text=False)


def write_files(evaluation: Evaluation, folder: Path) -> list[Path]:
    """per_class.csv, predictions.csv, confusion_matrix.csv and .png, confident_mistakes.png."""
    from visiontune import report

    names = [evaluation.classes[i] for i in evaluation.shown]
    counts = evaluation.scores.confusion[evaluation.shown][:, evaluation.shown].tolist()
    matrix = [
        {"true \\ predicted": name, **dict(zip(names, row, strict=True))}
        for name, row in zip(names, counts, strict=True)
    ]
    texts = {
        "per_class.csv": report.to_csv(per_class_rows(evaluation)),
        "predictions.csv": report.to_csv(prediction_rows(evaluation)),
        "confusion_matrix.csv": report.to_csv(matrix),
    }
    for name, text in texts.items():
        (folder / name).write_text(text)
    figures = {
        "confusion_matrix.png": report.confusion_matrix(counts, names),
        "confident_mistakes.png": report.confident_mistakes(*mistakes(evaluation)),
    }
    for name, figure in figures.items():
        figure.savefig(folder / name)
    return [folder / name for name in (*texts, *figures)]


def prediction_rows(evaluation: Evaluation) -> list[dict]:
    """path, true class, predicted class and its probability per image; the last two empty if skipped."""
    folder, predictions = evaluation.folder, evaluation.predictions
    rows = [
        {"path": path, "true": folder.classes[label], "predicted": "", "probability": ""}
        for path, label in folder.samples
    ]
    probability, predicted = predictions.top
    for row, i, p in zip(predictions.rows.tolist(), predicted.tolist(), probability.tolist(), strict=True):
        rows[row] |= {"predicted": evaluation.classes[i], "probability": f"{p:.6f}"}
    return rows


def mistakes(evaluation: Evaluation) -> tuple[list, list[str], int]:
    """The most confident wrong predictions (images and captions, at most MISTAKES_SHOWN) and how
    many predictions were wrong: the confident_mistakes figure's arguments."""
    import torch
    from torchvision.transforms.v2 import functional

    from visiontune import data

    predictions, classes = evaluation.predictions, evaluation.classes
    probability, predicted = predictions.top
    wrong = torch.nonzero(predicted != predictions.targets).flatten()
    worst = wrong[probability[wrong].argsort(descending=True)[:MISTAKES_SHOWN]]
    images, captions = [], []
    for i in worst.tolist():
        path = Path(evaluation.folder.samples[predictions.rows[i]][0])
        images.append(
            functional.resize(data.decode(str(path)), [160], antialias=True).permute(1, 2, 0).numpy()
        )
        captions.append(
            f"{path.name[:28]}\ntrue: {classes[predictions.targets[i]][:24]}\n"
            f"predicted: {classes[predicted[i]][:24]} ({probability[i]:.2f})"
        )
    return images, captions, len(wrong)


def summary(evaluation: Evaluation) -> list[str]:
    """Accuracy, macro F1, the per-class table, and the model classes it leaves out."""
    from visiontune import report

    result, predictions, classes = evaluation.scores, evaluation.predictions, evaluation.classes
    images, where = len(predictions.rows), evaluation.folder.folder
    present = int((result.support > 0).sum())
    rows = per_class_rows(evaluation)
    lines = [
        f"accuracy  {result.accuracy:.4f}  ({images} images of {where}, {predictions.skipped} skipped)",
        f"macro F1  {result.macro_f1:.4f}  (mean over the {present} classes with images)",
        f"balanced accuracy  {result.balanced_accuracy:.4f}  (mean recall over those classes)",
        *tta_lines(evaluation),
        "",
        report.to_markdown(rows).rstrip("\n"),
    ]
    if any(value is None for row in rows for value in row.values()):
        lines.append(UNDEFINED_NOTE)
    shown = set(evaluation.shown)
    absent = [name for i, name in enumerate(classes) if i not in shown]
    if absent:
        more = f" and {len(absent) - 20} more" if len(absent) > 20 else ""
        lines.append(f"left out, no images here and never predicted: {', '.join(absent[:20])}{more}")
    return lines


def tta_lines(evaluation: Evaluation) -> list[str]:
    """With --tta: the accuracy and macro F1 of the averaged views, beside the plain ones above."""
    result = tta_scores(evaluation)
    if result is None:
        return []
    gain = result.accuracy - evaluation.scores.accuracy
    return [
        f"accuracy with TTA  {result.accuracy:.4f}  ({gain:+.4f}: each image and its mirror averaged)",
        f"macro F1 with TTA  {result.macro_f1:.4f}",
    ]


def where_to_see(given_uri: str | None, uri: str, experiment_id: str, run_id: str) -> str:
    """The last line: the run's id and how to open it."""
    if uri.startswith(("http://", "https://")):
        return f"evaluation run {run_id}: open {commands.experiment_url(uri, experiment_id, run_id)}"
    command = "visiontune-ui" + (f" --tracking-uri {given_uri}" if given_uri else "")
    url = commands.experiment_url(UI_BASE, experiment_id, run_id)
    return f"evaluation run {run_id}: see it with {command}, at {url}"


if __name__ == "__main__":
    sys.exit(main())
