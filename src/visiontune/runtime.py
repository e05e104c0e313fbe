"""Where and how tensors are computed: device, precision, memory layout, determinism, data workers.

What training and inference (predict, evaluate, export, the benchmarks) share, without the loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from visiontune import VisiontuneError
from visiontune.augment import CropBatch

log = logging.getLogger("visiontune")


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
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False  # its choice of kernels varies from run to run
    torch.use_deterministic_algorithms(on)


AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_for(requested: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for precision=<requested>; None: float32.

    auto: bf16 on a CUDA GPU that has it, and on a CPU with bf16 instructions (AVX512-BF16 or
    AMX), where training measured x1.2 (alexnet) to x2.7 (squeezenet) faster than float32 for all
    six models (docs/performance.md); float32 elsewhere, including CPUs that only emulate bf16.
    """
    if requested != "auto":
        return AMP_DTYPES[requested]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    return None


def precision_and_layout(precision: str, channels_last: bool | str, device: torch.device):
    """(the autocast dtype or None, whether to train channels_last) for these settings on `device`.

    channels_last auto: NHWC wherever bf16 runs, whose fast convolutions want it (resnet18 training
    on a CPU: x1.2 in bf16); float32 convolutions measured about the same either way.
    """
    amp_dtype = precision_for(precision, device)
    layout = amp_dtype == torch.bfloat16 if channels_last == "auto" else channels_last
    if precision == "auto" or channels_last == "auto":
        name = {None: "float32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
        log.info("precision: %s; channels_last %s", name, layout)
    return amp_dtype, layout


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively. (oneDNN's own check also says yes on AVX512 CPUs
    without BF16, where it emulates bf16 more slowly than float32.)"""
    try:
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except AttributeError:  # a torch without these checks: keep float32
        return False


@dataclass(frozen=True)
class Runtime:
    """Where and how tensors are computed: device, input normalisation, autocast dtype, memory layout."""

    device: torch.device
    normalize: Callable[[torch.Tensor], torch.Tensor]
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

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


def worker_count(requested: int | str) -> int:
    """num_workers: a number as given; auto, up to 4 and never more than the CPUs this process may use."""
    if requested != "auto":
        return requested
    return min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
