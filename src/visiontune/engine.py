"""The training loop: train_one_epoch, evaluate and fit over them. Plain functions, no config inside."""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn
from tqdm import tqdm

from visiontune import VisiontuneError, distributed
from visiontune.models import PreparedModel
from visiontune.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PhaseResult:
    loss: float
    acc: float
    seconds: float
    first_nonfinite_batch: int | None = None  # 1-based: the first batch whose loss was nan or inf
    batches: int = 0


class NonFiniteLoss(VisiontuneError):
    """Training diverged: no model from this epoch on may be kept."""


@dataclass(frozen=True)
class Training:
    """What fit needs to train: the prepared model, its loss, optimiser and schedule, where, how long."""

    model: PreparedModel
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    scaler: torch.amp.GradScaler
    runtime: Runtime
    epochs: int
    scheduler_per_batch: bool = False  # OneCycleLR-like schedules step after every batch
    # Batches a frozen backbone (feature_extract) runs at once in training; None: sized to the
    # device on the first batch (batches_per_pass). The steps stay one per batch either way.
    backbone_batches: int | None = None
    compile: bool = False  # torch.compile what the training step and validation call

    def learning_rates(self) -> dict[str, float]:
        """The rate of each layer group the optimiser holds (its parameter groups' `name`)."""
        return {group.get("name", str(i)): group["lr"] for i, group in enumerate(self.optimizer.param_groups)}


class _Tally:
    """Loss and accuracy summed on the device; read back once per phase, not once per batch."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device)  # float32: MPS has no float64
        self.correct = torch.zeros((), device=device, dtype=torch.int64)
        # The first batch with a non-finite loss, kept on the device: checking each batch on the
        # host would stop a GPU once per batch.
        self.first_bad = torch.full((), -1, device=device, dtype=torch.int64)
        self.count = 0
        self.batches = 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.batches += 1
        loss = loss.detach()
        self.loss += loss * labels.numel()
        self.correct += (logits.argmax(dim=1) == labels).sum()
        self.count += labels.numel()
        first = (self.first_bad < 0) & ~torch.isfinite(loss)
        self.first_bad = torch.where(first, self.batches, self.first_bad)

    def result(self, seconds: float) -> PhaseResult:
        """Mean loss and accuracy of the phase; under torchrun over every rank's images, reduced
        here once per phase (sums, then the first bad batch), not once per batch."""
        device = self.loss.device
        loss, correct, count = distributed.sum_over_ranks(
            [self.loss.item(), self.correct.item(), self.count], device
        )
        count = max(count, 1)
        first_bad = int(self.first_bad.item())
        first_bad = distributed.min_over_ranks(first_bad if first_bad > 0 else math.inf, device)
        return PhaseResult(
            loss / count,
            correct / count,
            seconds,
            first_nonfinite_batch=int(first_bad) if first_bad < math.inf else None,
            batches=self.batches,
        )


def train_one_epoch(
    training: Training,
    loader,
    desc: str = "train",
    frozen: FrozenBackbone | None = None,
    trained: nn.Module | None = None,
    per_pass: int = 1,
) -> PhaseResult:
    """One optimisation pass over `loader`; with `frozen`, the backbone runs apart from the head,
    on `per_pass` batches at a time.

    `trained` is what the forward pass goes through: the model (or, with `frozen`, its `rest`),
    or that inside DistributedDataParallel.
    """
    model, runtime = training.model, training.runtime
    if trained is None:
        trained = frozen.rest if frozen is not None else model.module
    start = _clock(runtime.device)
    model.train_mode()
    tally = _Tally(runtime.device)
    batches = frozen.batches(loader, runtime, per_pass) if frozen is not None else _whole(loader, runtime)
    for inputs, labels in tqdm(batches, desc=desc, total=len(loader), leave=False, disable=None):
        with runtime.autocast():
            logits, loss = _training_loss(model.spec, trained, inputs, labels, training.criterion)
        training.optimizer.zero_grad(set_to_none=True)
        training.scaler.scale(loss).backward()
        training.scaler.step(training.optimizer)
        training.scaler.update()
        if training.scheduler_per_batch:
            training.scheduler.step()
        tally.add(loss, logits, labels)
    return tally.result(_clock(runtime.device) - start)


def _whole(loader, runtime: Runtime):
    """(model inputs, labels) per batch, for a model called whole."""
    for images, labels in loader:
        images, labels = runtime.inputs(images, labels)
        yield (images,), labels


def _training_loss(
    spec, module: nn.Module, inputs: tuple, labels, criterion
) -> tuple[torch.Tensor, torch.Tensor]:
    """(main logits, loss). A model with an auxiliary head returns its logits too in training."""
    if spec.aux_head is None:
        logits = module(*inputs)
        return logits, criterion(logits, labels)
    logits, aux_logits = module(*inputs)
    loss = criterion(logits, labels)
    if spec.aux_loss_weight:
        loss = loss + spec.aux_loss_weight * criterion(aux_logits, labels)
    return logits, loss


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    criterion: nn.Module,
    runtime: Runtime,
    desc: str = "val",
    cache: BackboneCache | None = None,
) -> PhaseResult:
    """Loss and accuracy of the main head over a whole loader, in eval mode.

    With a BackboneCache, the layers below the head run on the first call only.
    """
    start = _clock(runtime.device)
    model.eval()
    tally = _Tally(runtime.device)
    batches = cache.logits(loader, runtime) if cache else _logits(model, loader, runtime)
    for logits, labels in tqdm(batches, desc=desc, total=len(loader), leave=False, disable=None):
        with runtime.autocast():
            loss = criterion(logits, labels)
        tally.add(loss, logits, labels)
    return tally.result(_clock(runtime.device) - start)


def _logits(model: nn.Module, loader, runtime: Runtime):
    for images, labels in loader:
        images, labels = runtime.inputs(images, labels)
        with runtime.autocast():
            yield model(images), labels


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
    batch after batch (tests/test_engine.py checks all six models).

    Evaluation cuts at the heads alone (dropout does nothing in eval mode), so BackboneCache
    keeps everything below them.
    """

    def __init__(self, model: nn.Module, heads: tuple[str, ...]):
        self.train_stem, self.rest = _split(model, heads, training=True)
        self.eval_stem, self.eval_rest = _split(model, heads, training=False)
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

    def logits(self, loader, runtime: Runtime):
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


@dataclass(frozen=True)
class EpochReport:
    epoch: int
    train: PhaseResult
    val: PhaseResult
    lrs: dict[str, float]  # each layer group's rate as the epoch began
    seconds: float
    improved: bool
    trainable: tuple[str, ...] = ()  # the layer groups that trained


@dataclass(frozen=True)
class FitResult:
    best_acc: float
    best_epoch: int
    val_curve: list[float]


@dataclass
class Progress:
    """Where a fit stands after its last finished epoch: what a checkpoint keeps, and resumes from."""

    epoch: int = 0
    best_acc: float = -1.0
    best_epoch: int = 0
    best_state: dict | None = None  # a CPU copy of the weights of the best epoch
    curve: list[float] = field(default_factory=list)  # val accuracy per epoch


@distributed.peer_loss_as_interrupt()  # under torchrun: another rank died, this run is KILLED
def fit(
    training: Training,
    loaders: dict,
    cache_bytes: int = 0,
    on_epoch: Callable[[EpochReport, Progress], None] = lambda report, progress: None,
    progress: Progress | None = None,
) -> FitResult:
    """Train and validate each epoch after `progress`; end with the weights of the best val accuracy.

    Each epoch first applies the mode's plan for it (what trains). While the backbone is fixed,
    it runs apart from the head, and evaluation caches its output, up to `cache_bytes`.
    """
    prepared, module = training.model, training.model.module
    progress = progress or Progress()
    phases = _Phases(prepared, cache_bytes, training.compile)
    for epoch in range(progress.epoch + 1, training.epochs + 1):
        tic = time.perf_counter()
        split, cache, trained = phases.for_epoch(prepared.enter_epoch(epoch))
        lrs = training.learning_rates()
        if hasattr(loaders["train"], "set_epoch"):
            loaders["train"].set_epoch(epoch)
        per_pass = training.backbone_batches or (split.per_pass if split else None)
        tr = train_one_epoch(training, loaders["train"], f"epoch {epoch} train", split, trained, per_pass)
        distributed.average_norm_statistics(module)  # validation and checkpoints see the same ones
        if tr.first_nonfinite_batch is not None:
            raise NonFiniteLoss(_divergence(tr, epoch, lrs, training.runtime.amp_dtype == torch.float16))
        va = evaluate(
            phases.evaluated,
            loaders["val"],
            training.criterion,
            training.runtime,
            f"epoch {epoch} val",
            cache,
        )
        if training.scheduler is not None and not training.scheduler_per_batch:
            training.scheduler.step()
        improved = va.acc > progress.best_acc
        if improved:
            # A CPU copy: the next epoch's updates must not reach it.
            progress.best_state = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
            progress.best_acc, progress.best_epoch = va.acc, epoch
        progress.epoch = epoch
        progress.curve.append(va.acc)
        seconds = time.perf_counter() - tic
        report = EpochReport(epoch, tr, va, lrs, seconds, improved, prepared.trainable)
        on_epoch(report, progress)
    # Under torchrun the last epoch's weights must agree on every rank: the best epoch's may agree
    # only because it came before a stage whose gradients went unreduced.
    if distributed.world_size() > 1:
        distributed.same_weights_everywhere(module)
    module.load_state_dict(progress.best_state)
    return FitResult(progress.best_acc, progress.best_epoch, progress.curve)


class _Phases:
    """What an epoch trains through, for what trains in it: the frozen backbone's split and its
    evaluation cache while the backbone is fixed, and (under torchrun) DDP around what trains."""

    def __init__(self, prepared: PreparedModel, cache_bytes: int, compile: bool = False):
        self.prepared, self.cache_bytes, self.compile = prepared, cache_bytes, compile
        self.backbone: FrozenBackbone | None = None
        self.cache: BackboneCache | None = None
        self.trained: nn.Module | None = None
        # What validation calls without a cache: torch.compile keeps a graph per mode, eval's too.
        self.evaluated = self._compiled(prepared.module)

    def _compiled(self, module: nn.Module) -> nn.Module:
        return torch.compile(module) if self.compile else module

    def for_epoch(self, changed: bool) -> tuple[FrozenBackbone | None, BackboneCache | None, nn.Module]:
        """(training split, evaluation cache, module the training step calls) for the epoch entered
        last, whose trainable groups `changed` from the epoch before. Once the backbone trains the
        split and cache are dropped (its features no longer hold), and DDP is wrapped anew: it
        reduces the gradients of the parameters that trained when it was made."""
        prepared, spec = self.prepared, self.prepared.spec
        split = None
        if not prepared.cache_backbone:
            self.cache = None
        else:
            if self.backbone is None:
                self.backbone = FrozenBackbone(prepared.module, spec.heads)
                self.backbone.train_stem = self._compiled(self.backbone.train_stem)
                self.cache = BackboneCache(self.backbone, self.cache_bytes)
            split = self.backbone
        if changed or self.trained is None:
            self.trained = None  # the earlier wrapper lets go of its gradient hooks first
            # An auxiliary head that the loss ignores gets no gradient.
            self.trained = self._compiled(
                distributed.data_parallel(
                    split.rest if split else prepared.module,
                    find_unused_parameters=spec.aux_head is not None and not spec.aux_loss_weight,
                )
            )
        return split, self.cache, self.trained


def _divergence(result: PhaseResult, epoch: int, lrs: dict[str, float], fp16: bool) -> str:
    # Under autocast the loss itself is float32: a non-finite one means the forward pass
    # overflowed or the weights diverged, which the gradient scaler cannot undo.
    advice = f"lower optimizer.lr (it is {max(lrs.values()):g})" + (
        ", or use precision=off (float16 overflowed)" if fp16 else ""
    )
    where = f"first at batch {result.first_nonfinite_batch} of {result.batches}"
    return (
        f"the training loss became {result.loss:g} in epoch {epoch}, {where}: the run stops and keeps "
        f"no model from it; {advice}"
    )


def _clock(device: torch.device) -> float:
    # CUDA runs asynchronously: wait for it so phase times are real.
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
