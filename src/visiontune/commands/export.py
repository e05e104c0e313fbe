"""visiontune-export: a logged model as an ONNX file that runs without PyTorch or visiontune.

    visiontune-export <run id> --format onnx --out model.onnx [--log]

The file's input `image` is a float32 batch (N, 3, S, S) that is already preprocessed as
validation was in training (see PREPROCESSING); its output `logits` is (N, classes). Class names,
input size, mean, std, architecture and model name travel in the file's metadata_props. Every
export is checked: onnxruntime and PyTorch score the same random batches of 1 and 4 images.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import re
import sys
import tempfile
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from visiontune import commands

if TYPE_CHECKING:
    import torch

    from visiontune.classifier import Classifier

PROG = "visiontune-export"
FORMATS = ("onnx",)
# The exporter translates to opset 18 and converts up from there (down fails, keeping 18);
# onnxruntime has run opset 18 since 1.14, TensorRT since 10.
OPSET = 18
EXPORT_PACKAGES = ("onnx", "onnxruntime", "onnxscript")  # onnxscript: the exporter's translator
INPUT, OUTPUT = "image", "logits"
PARITY_BATCHES = (1, 4)  # neither is the traced 2: the file takes any batch size
TOLERANCE = 1e-4
PREPROCESSING = (
    "image: float32 (N, 3, input_size, input_size), RGB, already normalised: resize the shorter "
    "side to input_size (antialiased), centre-crop input_size x input_size, scale to [0, 1], then "
    "subtract mean and divide by std per channel. logits: float32 (N, len(classes)); a softmax "
    "over axis 1 gives the probabilities of classes, in their order."
)


@dataclass(frozen=True)
class Parity:
    """How far onnxruntime's logits are from PyTorch's on the same random batches."""

    max_diff: float
    largest_logit: float  # the largest |logit| PyTorch gave: float32 rounding grows with it

    @property
    def tolerance(self) -> float:
        """TOLERANCE for logits up to 1; relative to the logits' size beyond (a float32 keeps ~7 digits)."""
        return TOLERANCE * max(1.0, self.largest_logit)

    @property
    def matches(self) -> bool:
        return self.max_diff < self.tolerance


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.opset < OPSET:
        parser.error(f"--opset {args.opset}: the exporter writes opset {OPSET} or newer")
    problem = _cannot_start(args)
    if problem:
        return _fail(problem)
    uri = commands.model_store_uri(parser, args)

    from mlflow.exceptions import MlflowException

    from visiontune import VisiontuneError

    try:
        _export(args, uri)
    except (VisiontuneError, MlflowException) as err:
        return _fail(str(err))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    commands.add_model_argument(parser)
    parser.add_argument("--format", choices=FORMATS, default="onnx", help="file format (default: onnx)")
    parser.add_argument("--out", type=Path, required=True, metavar="FILE", help="the file to write")
    parser.add_argument(
        "--opset", type=int, default=OPSET, metavar="N", help=f"ONNX opset to target (default: {OPSET})"
    )
    parser.add_argument(
        "--log", action="store_true", help="also store FILE on the model's run, as the artifact onnx/FILE"
    )
    commands.add_store_option(parser)
    return parser


def _cannot_start(args: argparse.Namespace) -> str | None:
    """Why the export cannot begin, found before any model loads: missing packages, --log of a folder."""
    missing = [name for name in EXPORT_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        return f'ONNX export needs {" and ".join(missing)}: pip install "visiontune[export]"'
    if args.log and Path(args.model).is_dir():
        return (
            f"--log stores the file on the model's run, and {args.model} is a folder, not a run's model: "
            "give its run id or models:/ URI instead, or leave --log out"
        )
    return None


def _export(args: argparse.Namespace, uri: str) -> None:
    """Load the model, write and check the file (deleted where it does not match), report it, and
    store it on the model's run with --log."""
    from visiontune import VisiontuneError, flavor, store

    classifier = flavor.load(args.model, uri)
    if args.log and not classifier.run_id:
        raise VisiontuneError(
            f"--log: {args.model} was not logged by a run, so there is none to store the file on"
        )
    parity = export_onnx(classifier, args.out, args.opset)
    if not parity.matches:
        args.out.unlink()
        raise VisiontuneError(
            f"onnxruntime's logits differ from PyTorch's by up to {parity.max_diff:.1e} "
            f"(>= {parity.tolerance:.0e}) for {args.out}, so it was deleted: try another --opset"
        )
    print(_summary(classifier, args.out, parity))
    if args.log:
        logged = store.add_artifact(uri, classifier.run_id, args.out, "onnx")
        print(f"logged it to run {classifier.run_id}: {logged}")


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 1


def _summary(classifier: Classifier, out: Path, parity: Parity) -> str:
    batches = " and ".join(str(b) for b in PARITY_BATCHES)
    return (
        f"wrote {out} ({classifier.arch}, {len(classifier.classes)} classes, {classifier.input_size} px): "
        f"onnxruntime matches PyTorch, max |diff| {parity.max_diff:.1e} on batches of {batches}"
    )


def export_onnx(classifier: Classifier, out: Path, opset: int = OPSET) -> Parity:
    """Write the classifier's module (moved to the CPU, in eval mode) as ONNX with its metadata, then
    score the same random batches with onnxruntime and PyTorch."""
    import torch

    module = classifier.to(torch.device("cpu")).module
    program = _trace(module, classifier.input_size, opset)
    program.model.metadata_props.update(metadata(classifier))
    program.model.doc_string = PREPROCESSING
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        program.save(str(out))  # one file: weights go to a separate .data file only past 2 GB
    except OSError as err:
        from visiontune import VisiontuneError

        raise VisiontuneError(f"cannot write {out} ({err.strerror}): choose another --out") from err
    return compare(module, out, classifier.input_size)


def metadata(classifier: Classifier) -> dict[str, str]:
    """The file's metadata_props: the classifier's metadata (JSON; text as it is) and its preprocessing."""
    from visiontune import __version__

    props = {k: v if isinstance(v, str) else json.dumps(v) for k, v in classifier.metadata().items()}
    return props | {"preprocessing": PREPROCESSING, "producer": f"visiontune {__version__}"}


def _trace(module: torch.nn.Module, size: int, opset: int):
    """The module as an ONNXProgram with a free batch dimension; the exporter's chatter kept back.

    The dynamo exporter (torch.export), not the TorchScript one: the latter refuses alexnet and
    vgg whenever the input is not 224 px (their adaptive pooling to 6x6 / 7x7 must then divide
    the feature map), and is deprecated since torch 2.9. torch.export handles all six
    architectures at any size, and its symbolic batch dimension holds for every batch size.
    """
    import torch

    from visiontune import VisiontuneError

    example = torch.zeros(2, 3, size, size)  # not 1: torch.export specialises sizes of 0 and 1
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):  # warnings too
            program = torch.onnx.export(
                module,
                (example,),
                dynamo=True,
                input_names=[INPUT],
                output_names=[OUTPUT],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                opset_version=opset,
                verbose=False,
            )
    except Exception as err:
        with tempfile.NamedTemporaryFile(
            "w", prefix="visiontune-export-", suffix=".log", delete=False
        ) as log:
            log.write(chatter.getvalue() + traceback.format_exc())
        raise VisiontuneError(
            f"torch.onnx cannot export this model at opset {opset}: {_first_line(err)} "
            f"(the exporter's log: {log.name})"
        ) from err
    written = program.model.opset_imports.get("")
    if written != opset:  # a conversion it cannot do leaves the model at its own opset, with a warning
        raise VisiontuneError(
            f"--opset {opset}: torch.onnx cannot convert this model to that opset (it stays at {written}); "
            f"choose one from {OPSET} up"
        )
    return program


def compare(module: torch.nn.Module, path: Path, size: int) -> Parity:
    """Run the file in onnxruntime (CPU) and the module in PyTorch on the same random batches."""
    import numpy as np
    import onnxruntime
    import torch

    from visiontune import VisiontuneError

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: its notes on graph rewrites are for its developers
    generator = torch.Generator().manual_seed(0)
    max_diff = largest = 0.0
    try:  # onnxruntime raises its own error classes (Fail, InvalidArgument, ...)
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for batch in PARITY_BATCHES:
            images = torch.randn(batch, 3, size, size, generator=generator)  # normalised already
            with torch.inference_mode():
                expected = module(images).numpy()
            (got,) = session.run([OUTPUT], {INPUT: images.numpy()})
            if got.shape != expected.shape:
                raise ValueError(f"logits of shape {got.shape} where PyTorch gives {expected.shape}")
            max_diff = max(max_diff, float(np.abs(got - expected).max()))
            largest = max(largest, float(np.abs(expected).max()))
    except Exception as err:
        raise VisiontuneError(f"onnxruntime cannot run {path} as PyTorch does: {_first_line(err)}") from err
    return Parity(max_diff, largest)


def _first_line(err: BaseException) -> str:
    """The innermost cause's first line, uncoloured: the exporter wraps it in advice on next steps."""
    from visiontune import CAUSE_LIMIT, user_message

    while err.__cause__ is not None:
        err = err.__cause__
    lines = re.sub(r"\x1b\[[0-9;]*m", "", user_message(err)).splitlines() or [""]
    return f"{type(err).__name__}: {lines[0][:CAUSE_LIMIT]}"


if __name__ == "__main__":
    sys.exit(main())
