"""The frozen backbone of feature extraction: forward cut with torch.fx below the heads, run apart, cached."""

from __future__ import annotations

import contextlib
import itertools
import logging
from typing import TYPE_CHECKING

import torch
import torch.fx
from torch import nn

from visiontune import sharing

if TYPE_CHECKING:
    from visiontune.runtime import Runtime

log = logging.getLogger(__name__)


class FrozenBackbone:
    """A model whose layers below its heads do not train (feature extraction), run in two parts.

    `stem` is forward up to the first head, random op (dropout) or matrix product: a fixed
    function of each image, bit for bit whatever the batch, which runs without autograd, in its
    run's precision, and on several batches at once where that pays.
    `rest` is the remainder of forward, dropout's draws and the heads included, run per batch as
    usual (autograd records nothing before the heads: nothing there needs a gradient). Both parts
    are cut out of forward with torch.fx, so heads that are not the last layer (SqueezeNet's) or
    that read the backbone's middle (Inception's auxiliary head) work too. At float32 the
    results, dropout's random draws included, are bit for bit those of calling the model whole,
    batch after batch (tests/test_frozen.py checks all six models).

    Evaluation cuts at the heads alone (dropout does nothing in eval mode), so BackboneCache
    keeps everything below them.
    """

    def __init__(self, model: nn.Module, heads: tuple[str, ...]):
        try:
            self.train_stem, self.rest = _split(model, heads, training=True)
            self.eval_stem, self.eval_rest = _split(model, heads, training=False)
        except Exception as err:  # noqa: BLE001 - fx raises TraceError, TypeError, ... on Python control flow
            # The plain loop: the stem hands the images on, the rest is the whole model, per batch.
            first = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
            log.info(
                "frozen backbone: torch.fx cannot cut %s below its heads (%s): the whole model runs",
                type(model).__name__,
                first,
            )
            self.train_stem = self.eval_stem = _Images()
            self.rest = self.eval_rest = model
        self.per_pass: int | None = None  # batches per stem pass in training, once chosen

    def features(self, images: torch.Tensor, runtime: Runtime, training: bool = True) -> tuple:
        """The train or eval stem's outputs for `images`, in the run's precision, as the whole
        model would hand them on."""
        stem = self.train_stem if training else self.eval_stem
        with torch.no_grad(), runtime.autocast():
            return stem(images)

    def batches(self, loader, runtime: Runtime, per_pass: int | None):
        """(stem outputs, labels) for each batch of `loader`, the stem run on `per_pass` batches at a
        time (None: sized on the first batch, see batches_per_pass). The batches are normalised one
        by one, exactly as the plain loop does, and joined for the stem alone: what follows still
        takes one step per batch."""
        batches = iter(loader)
        while group := list(itertools.islice(batches, per_pass or 1)):
            inputs = [runtime.inputs(images, labels) for images, labels in group]
            images = torch.cat([images for images, _ in inputs]) if len(inputs) > 1 else inputs[0][0]
            if runtime.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            sizes = [len(labels) for _, labels in inputs]
            with _peak_memory(runtime.device, measure=per_pass is None) as peak:  # the first pass only
                pieces = [value.split(sizes) for value in self.features(images, runtime)]
            if self.per_pass is None:
                auto = per_pass is None
                per_pass = self.per_pass = batches_per_pass(runtime.device, peak()) if auto else per_pass
                log.info("frozen backbone: %d batch(es) per pass in training%s", per_pass, " (auto)" * auto)
            for k, (_, labels) in enumerate(inputs):
                yield tuple(piece[k] for piece in pieces), labels

    def logits(self, features: tuple, runtime: Runtime) -> torch.Tensor:
        """The main head's logits in evaluation, from eval-mode features."""
        with runtime.autocast():
            return self.eval_rest(*features)


class BackboneCache:
    """Evaluation for a model that only trains its head, with the backbone in eval mode.

    Everything below the head is then a fixed function and the val images never change, so
    the head's inputs are computed on the first pass only; later passes run the head and what
    follows it. Caching stops if the inputs would take more than `max_bytes`.
    """

    def __init__(self, backbone: FrozenBackbone, max_bytes: int):
        self.backbone = backbone
        self.max_bytes = max_bytes
        self.cached: list[tuple[tuple, torch.Tensor]] | None = None
        self.key: str | None = None  # what the cached outputs depend on, once looked up (sharing.py)

    def logits(self, loader, runtime: Runtime):
        if self.key is None and self.cached is None:  # the first pass: did an earlier job of this
            self.key = self.shared_key(loader, runtime)  # process run the same stem on the same batches?
            shared = sharing.get(self.key)
            self.cached = shared[0] if shared is not None and shared[1] <= self.max_bytes else None
        if self.cached is not None:
            for features, labels in self.cached:
                yield self.backbone.logits(features, runtime), labels
            return
        cache: list | None = []
        size = 0
        for images, labels in loader:
            images, labels = runtime.inputs(images, labels)
            features = self.backbone.features(images, runtime, training=False)
            size += sum(value.numel() * value.element_size() for value in features)
            if cache is not None and size <= self.max_bytes:
                cache.append((features, labels))
            else:
                cache = None
            yield self.backbone.logits(features, runtime), labels
        self.cached = cache
        if cache is not None:
            sharing.put(self.key, (cache, size), size)

    def shared_key(self, loader, runtime: Runtime) -> str | None:
        """What the cached outputs depend on: the eval stem (its code, hence the architecture and the
        cut, and its weights), the precision, layout and device, and the val loader's batches.
        None where the loader does not say what its batches are, or nothing would be cached."""
        identity = getattr(loader, "identity", None)
        if identity is None or self.max_bytes <= 0:
            return None
        stem = self.backbone.eval_stem
        weights = sharing.tensors_digest(stem.state_dict().values())
        where = (str(runtime.device), str(runtime.amp_dtype), runtime.channels_last)
        return sharing.key("backbone", stem.code, weights, where, identity)


# Up to this many batches per frozen pass on a GPU, within a quarter of its free memory: at
# batch 64 an H100 ran a frozen squeezenet 6x faster than at 8 (issue 9's figures).
MAX_BATCHES_PER_PASS = 32


def batches_per_pass(device: torch.device, batch_bytes: int) -> int:
    """How many batches a frozen backbone's pass takes at once, given one batch's peak memory.

    On a GPU, as many as fit in a quarter of its free memory (large batches fill it). On a CPU
    one: larger batches measured slower there (a frozen squeezenet in bf16 ran 174 images/s at
    batch 8, 92 at 64, on 2 cores with AVX512-BF16: the activations outgrow the caches).
    """
    if device.type != "cuda" or batch_bytes <= 0:
        return 1
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(MAX_BATCHES_PER_PASS, free // 4 // batch_bytes))


@contextlib.contextmanager
def _peak_memory(device: torch.device, measure: bool = True):
    """Yields a function giving the peak bytes the block allocated on a CUDA device (0 elsewhere,
    or when not asked to `measure`: resetting the statistics is not free on a hot path)."""
    if device.type != "cuda" or not measure:
        yield lambda: 0
        return
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    yield lambda: torch.cuda.max_memory_allocated(device) - before


# Where the stem stops in training: ops that draw from the random stream (every nn.Dropout kind
# derives from _DropoutNd), and matrix products, whose kernels are picked by the number of rows,
# so a row's result can change with the batch size in the last bits (vgg's first classifier
# layer did, on 6 rows against 2; the convolutions of all six models did not).
_PER_BATCH_MODULES = (nn.modules.dropout._DropoutNd, nn.Linear)
_PER_BATCH_FUNCTIONS = {
    nn.functional.dropout,
    nn.functional.dropout1d,
    nn.functional.dropout2d,
    nn.functional.dropout3d,
    nn.functional.alpha_dropout,
    nn.functional.feature_alpha_dropout,
    torch.dropout,
    nn.functional.linear,
    torch.matmul,
}


def _check_per_image(graph: torch.fx.Graph, crossing: list[torch.fx.Node]) -> None:
    """The stem hands on batches only: a value computed from the weights alone (timm's layer scales
    reshaped) has no batch dimension to split, so such a model runs whole (FrozenBackbone)."""
    from_input: set[torch.fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(n in from_input for n in node.all_input_nodes):
            from_input.add(node)
    fixed = [n.name for n in crossing if n not in from_input]
    if fixed:
        raise ValueError(f"the cut below the heads hands on values that are no batch: {', '.join(fixed[:3])}")


class _Images(nn.Module):
    """The stem of a model fx cannot cut: its input, as the one tensor the rest (the model) reads."""

    # What a cut stem's fx `code` is to the shared-cache key: this stem's whole computation.
    code = "def forward(self, images): return (images,)"

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor]:
        return (images,)


def _split(model: nn.Module, heads: tuple[str, ...], training: bool) -> tuple[torch.fx.GraphModule, ...]:
    """(stem, rest) of model.forward in train or eval mode: the stem maps the input to the tensors
    the rest reads, the rest maps those to the output. The rest begins at the first head or, in
    training, at the first op that must run per batch; everything reading its outputs is in it."""
    was_training = model.training
    model.train(training)  # inception's aux branch is a Python `if self.training`
    try:
        graph = torch.fx.symbolic_trace(model).graph
    finally:
        model.train(was_training)
    modules = dict(model.named_modules())

    def starts_rest(node: torch.fx.Node) -> bool:
        if node.op == "call_module":
            return node.target in heads or (training and isinstance(modules[node.target], _PER_BATCH_MODULES))
        return training and node.op == "call_function" and node.target in _PER_BATCH_FUNCTIONS

    later: set[torch.fx.Node] = set()
    for node in graph.nodes:
        if node.op == "output" or starts_rest(node) or any(n in later for n in node.all_input_nodes):
            later.add(node)
    # Constants (get_attr) go wherever they are read; they do not cross between the parts.
    crossing = [
        n for n in graph.nodes if n not in later and n.op != "get_attr" and any(u in later for u in n.users)
    ]
    _check_per_image(graph, crossing)

    stem, env = torch.fx.Graph(), {}
    for node in graph.nodes:
        if node not in later:
            env[node] = stem.node_copy(node, lambda n: env[n])
    stem.output(tuple(env[n] for n in crossing))

    rest = torch.fx.Graph()
    env = {n: rest.placeholder(n.name) for n in crossing}
    for node in graph.nodes:
        if node in later or (node.op == "get_attr" and any(u in later for u in node.users)):
            env[node] = rest.node_copy(node, lambda n: env[n])
    stem = torch.fx.GraphModule(model, stem)
    stem.graph.eliminate_dead_code()  # what only the rest reads
    stem.recompile()
    return stem, torch.fx.GraphModule(model, rest)
