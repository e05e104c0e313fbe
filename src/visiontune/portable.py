"""The logged model's own code: its weights rebuilt without unpickling, and images read into answers.

Each logged model carries a copy of this file as `code/visiontune_model.py` (MLflow's code_paths),
so `mlflow.pyfunc.load_model` needs torch, torchvision, pillow, numpy and pandas (and timm for a
timm model), not visiontune.
It therefore imports nothing of visiontune; visiontune's own loader (flavor.py) reads models
with this module too, so both rebuild a model the same way.

A model directory's `data/` holds `spec.json` (the torchvision builder or timm model name, its
source, its arguments, the head paths, the classes and the preprocessing) and `weights.pt`, a
state dict of tensors read with `torch.load(weights_only=True)`: a tampered file is refused, never
run. The preprocessing repeats visiontune.data's validation path (decode, EXIF turn, RGB, resize,
centre crop, normalise); tests/test_flavor.py checks that both score an image alike.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import json
import os
import stat
from pathlib import Path

SPEC_FILE = "spec.json"
WEIGHTS_FILE = "weights.pt"
FORMAT = 2  # 1: the pickled module of visiontune before this file existed
IMAGE_COLUMN = "image"
# What visiontune.models.build_model records on a module it builds: {"builder_kwargs", "heads"}.
BUILD_ATTRIBUTE = "visiontune_build"
COLUMNS = ["class", "probability", "top_classes", "top_probabilities", "error"]  # one row per image
# Serving bounds: decoded pixels per image and per request (a 13000 x 13000 PNG of a few kB
# decodes to 500 MB). model_config or these environment variables set them; a request cannot.
MAX_IMAGE_PIXELS = 40_000_000
MAX_REQUEST_PIXELS = 200_000_000
PIXEL_SETTINGS = {"max_image_pixels": MAX_IMAGE_PIXELS, "max_request_pixels": MAX_REQUEST_PIXELS}
# The model_config keys a loader may set (mlflow.pyfunc.load_model's model_config, or the server's
# MLFLOW_PYFUNC_INFERENCE_CONFIG); saved in the MLmodel file, as MLflow passes on only those.
LOAD_SETTINGS = {"device": None, "read_paths": False, "max_image_pixels": None, "max_request_pixels": None}
SPEC_KEYS = {
    "format": int,
    "arch": str,
    "builder_kwargs": dict,
    "heads": list,
    "classes": list,
    "input_size": int,
    "mean": list,
    "std": list,
}


class ModelFileError(ValueError):
    """A model directory whose spec or weights are missing, garbled or refused; one line."""


# --- saving and loading the module ------------------------------------------------------------------


def save(data_dir: Path, module, spec: dict) -> None:
    """The module's tensors and its spec into `data_dir` (created)."""
    import torch

    data_dir.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().contiguous() for key, value in module.state_dict().items()}
    torch.save(state, data_dir / WEIGHTS_FILE)
    (data_dir / SPEC_FILE).write_text(json.dumps(spec | {"format": FORMAT}, indent=1))


def read_spec(data_dir: Path) -> dict:
    """The checked spec.json of a model's `data/` folder."""
    path = Path(data_dir) / SPEC_FILE
    try:
        spec = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelFileError(f"{path} is missing: the model folder is incomplete") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFileError(f"{path} is not readable JSON ({err})") from None
    if not isinstance(spec, dict):
        raise ModelFileError(f"{path} holds a {type(spec).__name__}, not the model's spec")
    wrong = [key for key, kind in SPEC_KEYS.items() if not isinstance(spec.get(key), kind)]
    if wrong:
        raise ModelFileError(f"{path}: {', '.join(wrong)} missing or of the wrong type")
    if spec["format"] != FORMAT:
        raise ModelFileError(f"{path}: format {spec['format']}, this code reads format {FORMAT}")
    if not spec["classes"] or not all(isinstance(c, str) for c in spec["classes"]):
        raise ModelFileError(f"{path}: classes must be a non-empty list of names")
    numbers = [spec[key] for key in ("mean", "std")]
    if (
        any(len(n) != 3 or not all(isinstance(x, int | float) for x in n) for n in numbers)
        or 0 in spec["std"]
    ):
        raise ModelFileError(f"{path}: mean and std must be 3 numbers each, std none of them 0")
    if spec["input_size"] < 1 or not all(isinstance(h, str) for h in spec["heads"]):
        raise ModelFileError(f"{path}: input_size must be 1 or more, heads a list of module paths")
    return spec


def load_module(data_dir: Path, spec: dict):
    """The torchvision module the spec names, with the weights of `data_dir`, in eval mode."""
    import torch

    try:
        module = build(spec)
    except (ValueError, TypeError, KeyError, RuntimeError) as err:
        raise ModelFileError(f"{Path(data_dir) / SPEC_FILE}: cannot build {spec['arch']!r} ({err})") from None
    path = Path(data_dir) / WEIGHTS_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelFileError(f"{path} is missing: the model folder is incomplete") from None
    except Exception as err:  # pickle.UnpicklingError for anything but tensors, RuntimeError for a torn file
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ModelFileError(f"{path} is not a plain file of tensors, refused unread ({first})") from None
    if not isinstance(state, dict):
        raise ModelFileError(f"{path} holds a {type(state).__name__}, not a state dict")
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).splitlines()[0][:200]
        raise ModelFileError(f"{path} does not fit {spec['arch']} ({first})") from None
    return module.eval()


def build(spec: dict):
    """The spec's architecture with random weights and heads of its class count: a torchvision
    builder, or (source "timm") timm.create_model, which needs timm installed."""
    if spec.get("source", "torchvision") == "timm":
        import timm

        return timm.create_model(
            spec["arch"], pretrained=False, num_classes=len(spec["classes"]), **spec["builder_kwargs"]
        )
    from torchvision import models

    module = models.get_model(spec["arch"], weights=None, **spec["builder_kwargs"])
    for path in spec["heads"]:
        replace_head(module, path, len(spec["classes"]))
    return module


def replace_head(module, path: str, num_classes: int) -> None:
    """Swap the layer at module path `path` for a freshly initialised `num_classes` one."""
    from torch import nn

    try:
        old = module.get_submodule(path)
    except AttributeError:
        raise ModelFileError(f"{type(module).__name__} has no head at module path {path!r}") from None
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    elif isinstance(old, nn.Conv2d):
        new = nn.Conv2d(old.in_channels, num_classes, kernel_size=old.kernel_size, stride=old.stride)
    else:
        raise ModelFileError(f"head {path!r} is a {type(old).__name__}; only Linear and Conv2d heads swap")
    parent_path, _, name = path.rpartition(".")
    setattr(module.get_submodule(parent_path), name, new)


# --- images -------------------------------------------------------------------------------------------


class TooManyPixels(ValueError):
    """An image, or a request's images together, over the pixels allowed."""


def decode(source, max_pixels: int | None, name: str):
    """An encoded image (a path or a binary file) as an upright uint8 RGB tensor (3, H, W), its
    size checked from the header before any pixel is decoded."""
    from PIL import Image, ImageOps
    from torchvision.transforms import v2

    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # the limit below replaces Pillow's process-wide guard
    try:
        with Image.open(source) as image:
            pixels = image.width * image.height
            if max_pixels is not None and pixels > max_pixels:
                raise TooManyPixels(f"{name}: {pixels:,} pixels, over the limit of {max_pixels:,} per image")
            ImageOps.exif_transpose(image, in_place=True)
            return v2.PILToTensor()(to_rgb(image))
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def header_pixels(data: bytes) -> int:
    """How many pixels an encoded image claims, from its header alone (0 if it is not an image)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.width * image.height
    except Exception:  # noqa: BLE001 - decoding reports it properly, row by row
        return 0


def to_rgb(image):
    """8-bit RGB; 16-bit greys are scaled down, where convert("RGB") clips them at 255."""
    import numpy as np
    from PIL import Image

    if image.mode == "I" or image.mode.startswith("I;16"):
        values = np.asarray(image, dtype=np.float32)
        low, high = 0.0, 65535.0
        if values.min() < low or values.max() > high:  # 32-bit data, not from a 16-bit file
            low, high = float(values.min()), float(values.max())
        scaled = (values - low) * (255.0 / max(high - low, 1.0))
        image = Image.fromarray(scaled.round().astype(np.uint8))
    return image.convert("RGB")


def image_bytes(value, row: int, read_paths: bool) -> bytes:
    """A row's value as encoded image bytes: raw bytes, a base64 string (or data: URL), or, only
    where the loader allowed it, a path to a regular file."""
    if isinstance(value, str) and read_paths and len(value) < 4096 and os.path.exists(value):
        if not stat.S_ISREG(os.stat(value).st_mode):
            # Opening a FIFO waits for a writer forever, and a device such as /dev/zero never ends.
            raise ValueError(f"row {row}: {value} is not a regular file (a FIFO, a device or a socket)")
        return Path(value).read_bytes()
    if isinstance(value, str):
        text = value.split(",", 1)[1] if value.startswith("data:") else value
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            shown = value if len(value) <= 60 else value[:57] + "..."
            paths = "" if read_paths else " (file paths are read only with model_config={'read_paths': True})"
            raise ValueError(f"row {row}: {shown!r} is not base64 image data{paths}") from None
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise ValueError(f"row {row}: expected image bytes or a base64 string, got {type(value).__name__}")


class Preprocess:
    """uint8 (3, H, W) -> uint8 (3, S, S), then a uint8 batch -> a normalised float batch: as
    visiontune.data's val transform and Normalizer do, operation for operation."""

    def __init__(self, spec: dict, device):
        import torch
        from torchvision.transforms import v2

        size = spec["input_size"]
        self.transform = v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])
        std = torch.tensor(spec["std"], device=device).view(1, 3, 1, 1)
        self.scale = 1.0 / (255.0 * std)
        self.shift = -torch.tensor(spec["mean"], device=device).view(1, 3, 1, 1) / std

    def normalize(self, images):
        import torch

        return torch.addcmul(self.shift, images.float(), self.scale)


def settings(model_config: dict | None) -> dict:
    """The loader's settings: model_config's, else the environment's (VISIONTUNE_MAX_IMAGE_PIXELS,
    VISIONTUNE_MAX_REQUEST_PIXELS), else the defaults. Never a request's: params come over HTTP."""
    given = dict(model_config or {})
    chosen = {"device": given.get("device") or "cpu", "read_paths": bool(given.get("read_paths", False))}
    for key, default in PIXEL_SETTINGS.items():
        value = given.get(key)
        value = os.environ.get(f"VISIONTUNE_{key.upper()}", default) if value is None else value
        try:
            chosen[key] = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}={value!r}: give a whole number of pixels") from None
    return chosen


class ImageModel:
    """The pyfunc: a DataFrame of images in, one row of names and probabilities per image out."""

    def __init__(self, module, spec: dict, config: dict):
        import torch

        self.device = torch.device(config["device"])
        self.module = module.to(self.device).eval()
        self.spec, self.config = spec, config
        self.classes = list(spec["classes"])
        self.preprocess = Preprocess(spec, self.device)

    def get_raw_model(self):
        """The torch module (normalised float batches in, logits out): what mlflow.pytorch.load_model
        gave when the model was a pickle. `mlflow.pyfunc.load_model(uri).get_raw_model()`."""
        return self.module

    def probabilities(self, images, tta: bool = False):
        """Class probabilities (N, classes) in float32 on the CPU, for a uint8 batch (N, 3, S, S)
        (multi-label: each label's own); with tta the mean over the test-time views (view_probabilities)."""
        inputs = self.preprocess.normalize(images.to(self.device))
        multilabel = bool(self.spec.get("multilabel"))
        return view_probabilities(self.module, inputs, tta, multilabel).mean(0).cpu()

    def predict(self, model_input, params: dict | None = None):
        import pandas as pd

        k, tta = top_k_param(params), bool((params or {}).get("tta", False))
        rows = [
            self._row(probabilities, k) if error is None else dict.fromkeys(COLUMNS) | {"error": error}
            for probabilities, error in self.classify(image_values(model_input), tta=tta)
        ]
        # Object columns keep None as None: in float ones pandas turns it into NaN, which a served
        # answer would carry into its JSON, where NaN is not a value.
        return pd.DataFrame(rows, columns=COLUMNS, dtype=object)

    def classify(self, values: list, batch_size: int = 64, tta: bool = False) -> list[tuple]:
        """(probabilities, None) or (None, why it could not be read) for each value, in order."""
        import torch

        results: list[tuple] = [None] * len(values)
        budget = Budget(self.config["max_image_pixels"], self.config["max_request_pixels"])
        for start in range(0, len(values), batch_size):
            rows, images = [], []
            for row in range(start, min(start + batch_size, len(values))):
                try:
                    images.append(self.preprocess.transform(self.read(values[row], row, budget)))
                    rows.append(row)
                except (ValueError, OSError, SyntaxError) as err:  # PIL raises all three
                    results[row] = (None, str(err))
            if images:
                batch = self.probabilities(torch.stack(images), tta)
                for row, probabilities in zip(rows, batch, strict=True):
                    results[row] = (probabilities, None)
        return results

    def read(self, value, row: int, budget: Budget):
        """One row's image, decoded within the request's pixel budget."""
        from PIL import UnidentifiedImageError

        data = image_bytes(value, row, self.config["read_paths"])
        budget.spend(header_pixels(data), row)
        try:
            return decode(io.BytesIO(data), self.config["max_image_pixels"], name=f"row {row}")
        except UnidentifiedImageError:
            raise ValueError(f"row {row}: {len(data):,} bytes that are not an image PIL can read") from None

    def _row(self, probabilities, k: int) -> dict:
        import torch

        scores, indices = torch.topk(probabilities, min(k, probabilities.shape[0]))
        if self.spec.get("multilabel"):  # every label at the threshold or more, at least the best k
            chosen = int((probabilities >= self.spec.get("threshold", 0.5)).sum())
            scores, indices = torch.topk(probabilities, max(min(k, probabilities.shape[0]), chosen))
        names = [self.classes[i] for i in indices.tolist()]
        return {
            "class": names[0],
            "probability": scores[0].item(),
            "top_classes": names,
            "top_probabilities": scores.tolist(),
            "error": None,  # null in a served answer, where a missing value would be NaN
        }


def view_probabilities(module, inputs, tta: bool, multilabel: bool = False):
    """Probabilities (views, N, classes) in float32 of a normalised batch (N, 3, S, S), softmax (or
    each label's sigmoid where multilabel): one view without tta; with tta (test-time augmentation)
    the batch and its mirror image, as torchvision's and fastai's TTA flip, run as one batch."""
    import torch

    views = [inputs, inputs.flip(-1)] if tta else [inputs]
    with torch.inference_mode():
        logits = module(torch.cat(views))
    squash = torch.sigmoid if multilabel else functools.partial(torch.softmax, dim=1)
    return squash(logits.float()).view(len(views), len(inputs), -1)


class Budget:
    """The decoded pixels a request may still spend; images over either limit are refused by row."""

    def __init__(self, per_image: int, per_request: int):
        self.per_image, self.left, self.per_request = per_image, per_request, per_request

    def spend(self, pixels: int, row: int) -> None:
        if pixels > self.per_image:
            raise TooManyPixels(
                f"row {row}: {pixels:,} pixels, over the limit of {self.per_image:,} per image"
            )
        if pixels > self.left:
            raise TooManyPixels(
                f"row {row}: the request's images pass {self.per_request:,} pixels together; "
                "send fewer or smaller images per request"
            )
        self.left -= pixels


def top_k_param(params: dict | None) -> int:
    """params' top_k, refused below 1 as MLflow refuses a bad request (HTTP 400, one message)."""
    from mlflow.exceptions import MlflowException

    k = int((params or {}).get("top_k", 1))
    if k < 1:
        raise MlflowException.invalid_parameter_value(
            f"top_k={k}: give 1 or more, the number of classes to list per image"
        )
    return k


def image_values(model_input) -> list:
    """The images of a DataFrame (its `image` column, else its only one), a Series, or a list."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if IMAGE_COLUMN in model_input.columns:
            return list(model_input[IMAGE_COLUMN])
        if len(model_input.columns) == 1:
            return list(model_input.iloc[:, 0])
        raise ValueError(f"expected a column named {IMAGE_COLUMN!r}, got {list(model_input.columns)}")
    if isinstance(model_input, str | bytes):
        return [model_input]
    return list(model_input)


def load(data_dir, model_config: dict | None = None) -> ImageModel:
    """The pyfunc of a model's data folder, its weights read as tensors only."""
    spec = read_spec(Path(data_dir))
    return ImageModel(load_module(Path(data_dir), spec), spec, settings(model_config))


def _load_pyfunc(data_path: str, model_config: dict | None = None) -> ImageModel:
    """mlflow.pyfunc's entry point. model_config: device ("cuda"), read_paths (True: string
    values that name files are read, for the Python API only), max_image_pixels, max_request_pixels."""
    return load(data_path, model_config)
