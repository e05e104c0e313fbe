"""Device choice, precision: where and how a run computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from visiontune import VisiontuneError, runtime


def test_precision_auto_is_bf16_where_the_hardware_computes_it():
    cpu = torch.device("cpu")
    assert runtime.precision_for("off", cpu) is None
    assert runtime.precision_for("bf16", cpu) == torch.bfloat16
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    assert runtime.precision_for("auto", cpu) == (torch.bfloat16 if native else None)


@pytest.mark.parametrize(
    ("requested", "cuda_count", "local_rank", "job_number", "chosen"),
    [
        ("auto", 0, None, None, "cpu"),
        ("auto", 0, 1, 3, "cpu"),  # torchrun or a sweep on a machine without GPUs
        ("auto", 4, None, None, "cuda"),
        ("auto", 4, 2, None, "cuda:2"),  # torchrun: the rank's own GPU
        ("cuda", 4, 3, None, "cuda:3"),
        ("auto", 4, None, 0, "cuda:0"),  # a joblib sweep with n_jobs=4: jobs 0-3 on four GPUs
        ("auto", 4, None, 3, "cuda:3"),
        ("auto", 4, None, 6, "cuda:2"),  # later jobs wrap round
        ("cuda:1", 4, None, 6, "cuda:1"),  # an explicit GPU stays as asked
        ("cpu", 4, 1, 6, "cpu"),
    ],
)
def test_device_choice_by_torchrun_rank_and_sweep_job(requested, cuda_count, local_rank, job_number, chosen):
    assert runtime.choose_device(requested, cuda_count, local_rank, job_number) == chosen


def test_one_gpu_named_for_every_torchrun_rank_is_refused():
    with pytest.raises(VisiontuneError, match="every rank on one GPU"):
        runtime.choose_device("cuda:0", 2, 1, None)
