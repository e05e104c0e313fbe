"""A trained model as users use it: its class names and preprocessing travel with its weights.

Prediction preprocesses exactly as validation did during training (data.decode, the val
transform, data.Normalizer), so a logged model scores its own val split as the run did.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from visiontune import VisiontuneError, data, portable


@dataclass
class Classifier:
    """An image classifier and what it needs to read images: class names, input size, normalisation."""

    module: torch.nn.Module
    classes: list[str]
    input_size: int
    model: str = ""  # the model config's name (resnet, inception, ...)
    arch: str = ""  # the torchvision builder (resnet18, ...)
    mean: tuple[float, ...] = data.IMAGENET_MEAN
    std: tuple[float, ...] = data.IMAGENET_STD
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # Where a logged model came from (MLflow's MLmodel file): the training run and the model id.
    run_id: str = ""
    model_id: str = ""
    # Multi-label (data.label_delim): a sigmoid per class; labels at `threshold` or more are predicted.
    multilabel: bool = False
    threshold: float = 0.5

    def metadata(self) -> dict:
        """What the logged model's MLmodel file records beside the weights."""
        keys = ("classes", "input_size", "model", "arch")
        meta = {k: getattr(self, k) for k in keys} | {"mean": list(self.mean), "std": list(self.std)}
        return meta | ({"multilabel": True, "threshold": self.threshold} if self.multilabel else {})

    def spec(self) -> dict:
        """What rebuilds the module without unpickling it (portable.py): the metadata, the builder's
        arguments and the head paths that models.build_model recorded on the module."""
        build = getattr(self.module, portable.BUILD_ATTRIBUTE, None)
        if not isinstance(build, dict):
            raise VisiontuneError(
                f"this {type(self.module).__name__} was not built by visiontune.models.build_model, so "
                "its builder arguments and head paths are unknown and it cannot be logged"
            )
        return self.metadata() | {
            "builder_kwargs": dict(build["builder_kwargs"]),
            "heads": list(build["heads"]),
            "source": build.get("source", "torchvision"),
        }

    @classmethod
    def from_metadata(cls, module: torch.nn.Module, meta: dict, **source: str) -> Classifier:
        return cls(
            module.eval(),
            classes=list(meta["classes"]),
            input_size=int(meta["input_size"]),
            model=meta.get("model", ""),
            arch=meta.get("arch", ""),
            mean=tuple(meta.get("mean", data.IMAGENET_MEAN)),
            std=tuple(meta.get("std", data.IMAGENET_STD)),
            multilabel=bool(meta.get("multilabel", False)),
            threshold=float(meta.get("threshold", 0.5)),
            **source,
        )

    def to(self, device: torch.device) -> Classifier:
        self.module.to(device).eval()
        self.device = device
        self.__dict__.pop("normalize", None)  # made again on the new device
        return self

    @functools.cached_property
    def transform(self):
        """uint8 image -> uint8 (3, input_size, input_size): validation's resize and centre crop."""
        return data.transforms(self.input_size)["val"]

    @functools.cached_property
    def normalize(self) -> data.Normalizer:
        return data.Normalizer(self.device, self.mean, self.std)

    def probabilities(self, images: torch.Tensor, tta: bool = False) -> torch.Tensor:
        """Class probabilities (N, classes) in float32 on the CPU, for a uint8 batch from `transform`
        (multi-label: each class's own, from a sigmoid); with tta the mean over the test-time views
        (the image and its mirror)."""
        return self.view_probabilities(images, tta).mean(0)

    def view_probabilities(self, images: torch.Tensor, tta: bool = True) -> torch.Tensor:
        """(views, N, classes): each test-time view's probabilities, the first the plain image's."""
        inputs = self.normalize(images.to(self.device, non_blocking=True))
        return portable.view_probabilities(self.module, inputs, tta, self.multilabel).cpu()


def above(probabilities: torch.Tensor, threshold: float) -> list[list[tuple[int, float]]]:
    """Multi-label: per row, every (class index, probability) at `threshold` or more, best first."""
    rows = []
    for row in probabilities.tolist():
        rows.append(sorted(((i, p) for i, p in enumerate(row) if p >= threshold), key=lambda x: -x[1]))
    return rows


def top_k(probabilities: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest probabilities per row and their class indices, best first."""
    return torch.topk(probabilities, min(k, probabilities.shape[1]), dim=1)


# --- images given as files, decoded by loader workers ----------------------------------------------


def classify_files(
    classifier: Classifier,
    paths: Sequence[str],
    batch_size: int,
    num_workers: int,
    score: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(row indices, probabilities) per batch; rows of files that do not decode are left out
    (each with a warning line from data.ImageFiles). A progress bar on stderr, when it is a terminal.

    `score` turns a uint8 batch into what is yielded: classifier.probabilities unless given
    (a TTA variant, say)."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    files = data.ImageFiles([(p, i) for i, p in enumerate(paths)], classifier.transform, skip_bad=True)
    loader = data.SkippingLoader(
        DataLoader(
            files,
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=data.collate,
            pin_memory=classifier.device.type == "cuda",
        )
    )
    decoded = 0
    with tqdm(total=len(paths), unit="img", disable=None, file=sys.stderr) as bar:
        for images, rows in loader:
            yield rows, (score or classifier.probabilities)(images)
            decoded += len(rows)
            bar.update(decoded + loader.skipped - bar.n)  # skipped images count as done too
