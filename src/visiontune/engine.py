"""The training loop: train_one_epoch, evaluate and fit over them. Plain functions, no config inside."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn
from tqdm import tqdm

from visiontune import VisiontuneError, distributed
from visiontune.augment import CropBatch
from visiontune.models import PreparedModel


def pick_device(requested: str, local_rank: int | None = None, job_number: int | None = None) -> torch.device:
    """auto (a CUDA GPU if there is one), cpu, mps, cuda or cuda:N, refused in one line if absent.

    Under torchrun (`local_rank`) each rank takes its own GPU; in a sweep (`job_number`) auto
    spreads the jobs over the GPUs.
    """
    from visiontune.config import DEVICE

    if not DEVICE.fullmatch(requested):
        raise VisiontuneError(f"device {requested!r} is not a device: use auto, cpu, cuda, cuda:N or mps")
    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = torch.device(choose_device(requested, cuda_count, local_rank, job_number))
    if device.type == "cuda" and not cuda_count:
        raise VisiontuneError(
            f"device {requested} was asked for but this machine has no CUDA GPU: use auto or cpu"
        )
    if device.type == "cuda" and (device.index or 0) >= cuda_count:
        raise VisiontuneError(f"device {requested}: this machine has {cuda_count} CUDA GPU(s)")
    return device


def choose_device(requested: str, cuda_count: int, local_rank: int | None, job_number: int | None) -> str:
    """The device name for `requested` on a machine with `cuda_count` GPUs.

    A torchrun worker uses the GPU of its LOCAL_RANK (one GPU per rank, as nccl wants); a sweep's
    job under auto uses GPU job_number % count, so that a joblib sweep with n_jobs = GPUs puts
    each of its parallel jobs (consecutive numbers) on a GPU of its own.
    """
    if requested == "auto":
        if not cuda_count:
            return "cpu"
        requested = "cuda"
    if requested != "cuda":
        if local_rank is not None and requested.startswith("cuda:"):
            raise VisiontuneError(
                f"device={requested} under torchrun would put every rank on one GPU: use device=auto "
                f"or cuda (each rank takes cuda:LOCAL_RANK)"
            )
        return requested
    if local_rank is not None:
        return f"cuda:{local_rank}"
    if job_number is not None and cuda_count:
        return f"cuda:{job_number % cuda_count}"
    return "cuda"


def make_deterministic(on: bool) -> None:
    """deterministic=true: torch's deterministic algorithms, an error where an op has none.

    cuBLAS needs its workspace fixed before its first use for that (CUBLAS_WORKSPACE_CONFIG).
    """
    import os

    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False  # its choice of kernels varies from run to run
    torch.use_deterministic_algorithms(on)


AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_for(requested: str, device: torch.device) -> tuple[torch.dtype | None, torch.dtype | None]:
    """(autocast dtype of the training step, of a frozen backbone's pass) for precision=<requested>.

    auto: bf16 throughout on a CUDA GPU that has it; on a CPU with bf16 instructions only for a
    frozen backbone's forward pass, where it measured faster (training through bf16 on such a
    CPU measured slower than float32); float32 elsewhere.
    """
    if requested != "auto":
        return AMP_DTYPES[requested], AMP_DTYPES[requested]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16, torch.bfloat16
    if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None, torch.bfloat16
    return None, None


@dataclass(frozen=True)
class Runtime:
    """Where and how tensors are computed: device, input normalisation, autocast dtype, memory layout."""

    device: torch.device
    normalize: Callable[[torch.Tensor], torch.Tensor]
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    # Autocast for a frozen backbone's forward pass alone (no gradients flow there): where bf16
    # pays in forward-only work but not in training, as on CPUs with AVX512-BF16 or AMX.
    frozen_amp_dtype: torch.dtype | None = None

    def autocast(self, frozen: bool = False):
        dtype = self.frozen_amp_dtype if frozen else self.amp_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def inputs(
        self, images: torch.Tensor | CropBatch, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch on the device, normalised: uint8 images, or crops to render first (data.gpu_augment)."""
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        images = images.to(self.device, non_blocking=True)
        if isinstance(images, CropBatch):
            images = images.render()
        images = self.normalize(images)
        return images.contiguous(memory_format=fmt), labels.to(self.device, non_blocking=True)


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
) -> PhaseResult:
    """One optimisation pass over `loader`; with `frozen`, the backbone runs apart from the head.

    `trained` is what the forward pass goes through: the model (or, with `frozen`, the part from
    its head on), or that inside DistributedDataParallel.
    """
    model, runtime = training.model, training.runtime
    trained = trained or (frozen.tail if frozen is not None else model.module)
    start = _clock(runtime.device)
    model.train_mode()
    tally = _Tally(runtime.device)
    for images, labels in tqdm(loader, desc=desc, leave=False, disable=None):
        images, labels = runtime.inputs(images, labels)
        if frozen is not None:
            features = frozen.features(images, runtime)
            with runtime.autocast():
                logits = trained(features)
                loss = training.criterion(logits, labels)
        else:
            with runtime.autocast():
                logits, loss = _training_loss(model.spec, trained, images, labels, training.criterion)
        training.optimizer.zero_grad(set_to_none=True)
        training.scaler.scale(loss).backward()
        training.scaler.step(training.optimizer)
        training.scaler.update()
        if training.scheduler_per_batch:
            training.scheduler.step()
        tally.add(loss, logits, labels)
    return tally.result(_clock(runtime.device) - start)


def _training_loss(spec, module: nn.Module, images, labels, criterion) -> tuple[torch.Tensor, torch.Tensor]:
    """(main logits, loss). A model with an auxiliary head returns its logits too in training."""
    if spec.aux_head is None:
        logits = module(images)
        return logits, criterion(logits, labels)
    logits, aux_logits = module(images)
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


class _HeadReached(Exception):
    """Raised by FrozenBackbone's hook: the forward pass stops where the head would begin."""


class FrozenBackbone:
    """A model whose layers below its head do not train (feature extraction), run in two parts.

    The layers below the head run without autograd and in their own precision
    (Runtime.frozen_amp_dtype); the head and whatever follows it in forward (found with
    torch.fx, so heads that are not the last layer, like SqueezeNet's, work too) run as usual.
    The parts run in the order of one forward pass, so the results, dropout's random draws
    included, are those of calling the model whole.
    """

    def __init__(self, model: nn.Module, head: str):
        self.model = model
        self.head = model.get_submodule(head)
        self.tail = _graph_after(model, head)

    def features(self, images: torch.Tensor, runtime: Runtime, training: bool = True) -> torch.Tensor:
        """The head's input for `images`, float32. (A hook per call: microseconds, next to a pass.)

        Only training uses the frozen pass's own precision: validation computes its features once
        (BackboneCache), where bf16 would save little and move val accuracy away from what the
        logged model, predicting in float32, reproduces."""
        captured: list[torch.Tensor] = []

        def stop(_, args):
            captured.append(args[0])
            raise _HeadReached

        hook = self.head.register_forward_pre_hook(stop)
        try:
            with torch.no_grad(), runtime.autocast(frozen=training):
                self.model(images)
        except _HeadReached:
            pass
        finally:
            hook.remove()
        return captured[0].float()

    def logits(self, features: torch.Tensor, runtime: Runtime) -> torch.Tensor:
        with runtime.autocast():
            return self.tail(features)


class BackboneCache:
    """Evaluation for a model that only trains its head, with the backbone in eval mode.

    Everything below the head is then a fixed function and the val images never change, so
    the head's inputs are computed on the first pass only; later passes run the head and what
    follows it. Caching stops if the inputs would take more than `max_bytes`.
    """

    def __init__(self, backbone: FrozenBackbone, max_bytes: int):
        self.backbone = backbone
        self.max_bytes = max_bytes
        self.cached: list[tuple[torch.Tensor, torch.Tensor]] | None = None

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
            size += features.numel() * features.element_size()
            if cache is not None and size <= self.max_bytes:
                cache.append((features, labels))
            else:
                cache = None
            yield self.backbone.logits(features, runtime), labels
        self.cached = cache


def _graph_after(model: nn.Module, head: str) -> torch.fx.GraphModule:
    """The part of model.forward from `head`'s input to the output, as a module of its own."""
    was_training = model.training
    model.eval()  # trace the eval forward: inception's aux branch is a Python `if self.training`
    try:
        graph = torch.fx.symbolic_trace(model).graph
    finally:
        model.train(was_training)
    head_node = next(n for n in graph.nodes if n.op == "call_module" and n.target == head)
    tail = torch.fx.Graph()
    env = {head_node.args[0]: tail.placeholder("features")}
    nodes = list(graph.nodes)
    for node in nodes[nodes.index(head_node) :]:
        # A KeyError here means the rest of forward reads more than the head's input.
        env[node] = tail.node_copy(node, lambda n: env[n])
    return torch.fx.GraphModule(model, tail)


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
    phases = _Phases(prepared, cache_bytes)
    for epoch in range(progress.epoch + 1, training.epochs + 1):
        tic = time.perf_counter()
        split, cache, trained = phases.for_epoch(prepared.enter_epoch(epoch))
        lrs = training.learning_rates()
        if hasattr(loaders["train"], "set_epoch"):
            loaders["train"].set_epoch(epoch)
        tr = train_one_epoch(training, loaders["train"], f"epoch {epoch} train", split, trained)
        distributed.average_norm_statistics(module)  # validation and checkpoints see the same ones
        if tr.first_nonfinite_batch is not None:
            raise NonFiniteLoss(_divergence(tr, epoch, lrs, training.runtime.amp_dtype == torch.float16))
        va = evaluate(
            module, loaders["val"], training.criterion, training.runtime, f"epoch {epoch} val", cache=cache
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

    def __init__(self, prepared: PreparedModel, cache_bytes: int):
        self.prepared, self.cache_bytes = prepared, cache_bytes
        self.backbone: FrozenBackbone | None = None
        self.cache: BackboneCache | None = None
        self.trained: nn.Module | None = None

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
                self.backbone = FrozenBackbone(prepared.module, spec.head)
                self.cache = BackboneCache(self.backbone, self.cache_bytes)
            # An auxiliary head that trains reads the backbone's middle: such a model trains whole.
            split = self.backbone if spec.aux_head is None else None
        if changed or self.trained is None:
            self.trained = None  # the earlier wrapper lets go of its gradient hooks first
            # An auxiliary head that the loss ignores gets no gradient.
            self.trained = distributed.data_parallel(
                split.tail if split else prepared.module,
                find_unused_parameters=spec.aux_head is not None and not spec.aux_loss_weight,
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
