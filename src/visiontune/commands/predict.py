"""visiontune-predict: class names and probabilities for image files, from a logged model.

    visiontune-predict <run id> photos/ extra.jpg "more/**/*.png" --top-k 2 --out preds.csv

Images are decoded by loader workers and preprocessed as validation was during training; one
that cannot be read is a warning line and a row marked unreadable, never a failed command.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import glob
import json
import logging
import os
import stat
import sys
from collections.abc import Sequence
from pathlib import Path

from visiontune import commands

WILDCARDS = frozenset("*?[")
log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = _parse(parser, argv)

    from visiontune import VisiontuneError

    try:
        paths = find_images(args.paths)
        rows = predict(args, paths, commands.model_store_uri(parser, args))
    except VisiontuneError as err:
        print(f"visiontune-predict: error: {err}", file=sys.stderr)
        return 1
    return _write_rows(rows, args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visiontune-predict",
        description="Predict the classes of image files with a model a visiontune run logged.",
    )
    commands.add_model_argument(parser)
    parser.add_argument(
        "paths", nargs="+", metavar="PATH", help="image files, folders (searched recursively) or globs"
    )
    parser.add_argument("--top-k", type=int, default=1, help="how many classes to list per image (default 1)")
    parser.add_argument(
        "--threshold",
        type=float,
        help="multi-label models: list every label this probable or more (default: predict.threshold)",
    )
    parser.add_argument("--format", choices=("csv", "json"), default="csv")
    parser.add_argument("--out", type=Path, help="file to write (default: standard output)")
    parser.add_argument(
        "--device", default="auto", help="auto (a GPU if there is one), cpu, cuda, cuda:1, ..."
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--num-workers", type=int, default=min(4, os.cpu_count() or 1), help="decoding processes"
    )
    parser.add_argument(
        "--tta",
        action="store_true",
        help="test-time augmentation: average each image's and its mirror's probabilities",
    )
    commands.add_store_option(parser)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """The arguments, refused before any model loads where a number or the --out folder is wrong."""
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1 or args.num_workers < 0:
        parser.error("--top-k and --batch-size take 1 or more, --num-workers 0 or more")
    if args.threshold is not None and not 0 < args.threshold < 1:
        parser.error(f"--threshold {args.threshold}: give a probability between 0 and 1, e.g. 0.5")
    logging.basicConfig(format="visiontune-predict: %(levelname)s: %(message)s", level=logging.WARNING)
    if args.out and not args.out.parent.is_dir():
        parser.error(f"--out {args.out}: the folder {args.out.parent} does not exist")
    return args


def _write_rows(rows: list[dict], args: argparse.Namespace) -> int:
    """Write the rows where --out says; the exit code."""
    try:
        width = max([args.top_k, *(len(row["classes"]) for row in rows)])  # multi-label: every label listed
        write(rows, args.format, args.out, width)
    except BrokenPipeError:  # `visiontune-predict ... | head`: the reader has all it wants
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's advice, for exit
        return 1
    except OSError as err:
        print(f"visiontune-predict: error: cannot write --out {args.out} ({err.strerror})", file=sys.stderr)
        return 1
    unreadable = sum(1 for row in rows if row["error"])
    if args.out:
        print(f"wrote {len(rows)} rows to {args.out} ({unreadable} unreadable)", file=sys.stderr)
    return 0


def find_images(given: Sequence[str]) -> list[str]:
    """Files as given, folders' images (recursively, hidden ones left out) and globs, each once."""
    from visiontune import VisiontuneError, data

    found: dict[str, None] = {}  # ordered and without repeats
    for item in given:
        matches = sorted(glob.glob(item, recursive=True)) if WILDCARDS & set(item) else [item]
        if not matches:
            raise VisiontuneError(f"{item!r} matches no file. Check the pattern, or quote it for the shell.")
        for match in matches:
            path = Path(match)
            if path.is_dir():
                found.update((str(p), None) for p in data.image_files(path))
            elif os.path.lexists(match):  # a file, or a FIFO, device or broken link: a row all the same
                found[match] = None
            else:
                raise VisiontuneError(f"{match}: no such file or folder")
    if not found:
        raise VisiontuneError(
            f"no image files in {', '.join(given)} (looked for {', '.join(data.IMG_EXTENSIONS)})"
        )
    return list(found)


def predict(args: argparse.Namespace, paths: list[str], uri: str) -> list[dict]:
    """One row per path, in order: the top k classes and probabilities, or why it is unreadable."""
    from visiontune import classifier, flavor, runtime

    device = runtime.pick_device(args.device)
    model = flavor.load(args.model, uri).to(device)
    rows = [{"path": path, "classes": [], "probabilities": [], "error": "unreadable"} for path in paths]
    files = [i for i, path in enumerate(paths) if _is_regular_file(path)]
    score = functools.partial(model.probabilities, tta=args.tta)
    batches = classifier.classify_files(
        model, [paths[i] for i in files], args.batch_size, args.num_workers, score
    )
    for indices, probabilities in batches:
        for row, chosen in zip(indices.tolist(), _chosen(model, probabilities, args), strict=True):
            named = [model.classes[i] for i, _ in chosen]
            rows[files[row]] |= {"classes": named, "probabilities": [p for _, p in chosen], "error": ""}
    return rows


def _chosen(model, probabilities, args: argparse.Namespace) -> list[list[tuple[int, float]]]:
    """Per image, (class index, probability) best first: the top k classes, or for a multi-label
    model every label at the threshold (--threshold, else the model's predict.threshold) or more."""
    from visiontune import classifier

    if model.multilabel:
        return classifier.above(probabilities, args.threshold or model.threshold)
    scores, classes = classifier.top_k(probabilities, args.top_k)
    return [list(zip(c, s, strict=True)) for c, s in zip(classes.tolist(), scores.tolist(), strict=True)]


def _is_regular_file(path: str) -> bool:
    """Whether `path` (its link followed) is a regular file; a warning line where it is not.

    Anything else is never opened: a FIFO opened for reading waits for a writer forever, and a
    device such as /dev/zero never ends. The file's type comes from stat, which opens nothing.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as err:  # a dangling link (ENOENT), a looping one (ELOOP)
        log.warning("skipping %s: %s", path, err.strerror)
        return False
    if not stat.S_ISREG(mode):
        log.warning("skipping %s: not a regular file (a FIFO, a device or a socket)", path)
        return False
    return True


def write(rows: list[dict], format: str, out: Path | None, top_k: int) -> None:
    with open(out, "w", newline="") if out else contextlib.nullcontext(sys.stdout) as stream:
        if format == "json":
            json.dump([_json_row(row) for row in rows], stream, indent=1)
            stream.write("\n")
            return
        ranks = [("class", "probability")] + [(f"class_{r}", f"probability_{r}") for r in range(2, top_k + 1)]
        writer = csv.writer(stream)
        writer.writerow(["path", *(name for pair in ranks for name in pair), "error"])
        for row in rows:
            pairs = zip(row["classes"], (f"{p:.6f}" for p in row["probabilities"]), strict=True)
            cells = [cell for pair in pairs for cell in pair]
            writer.writerow([row["path"], *cells, *[""] * (2 * len(ranks) - len(cells)), row["error"]])


def _json_row(row: dict) -> dict:
    top = [{"class": c, "probability": p} for c, p in zip(row["classes"], row["probabilities"], strict=True)]
    best = top[0] if top else {"class": None, "probability": None}
    return {"path": row["path"], **best, "top_k": top, "error": row["error"] or None}


if __name__ == "__main__":
    sys.exit(main())
