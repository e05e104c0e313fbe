"""What runs only on a CUDA GPU: bf16 auto, crops rendered on the device, backbone_batch_size auto,
torch.compile, torchrun with nccl, one GPU per sweep job, predict and the pyfunc on CUDA.

Marked `gpu`: they skip without CUDA, and `pytest -m gpu` runs them where there is one
(benchmarks/gpu_check.sh does, with the benchmarks).
"""

from __future__ import annotations

import pytest
import torch

from helpers import FAST, compose_cfg, make_image_folder, predict_here, run_cli

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
CUDA = torch.device("cuda", 0)


def test_auto_precision_is_bf16_and_channels_last_on_this_gpu(standin_weights):
    from helpers import prepare_model
    from visiontune import config, pipeline

    prepared = prepare_model("resnet", "finetune", standin_weights)
    settings = config.read(compose_cfg("model=resnet", "mode=finetune"))
    training = pipeline.build_training(settings, prepared, CUDA, 1, backbone_cache_bytes=0)
    bf16 = torch.cuda.is_bf16_supported()
    assert training.runtime.amp_dtype == (torch.bfloat16 if bf16 else None)
    assert training.runtime.channels_last == bf16
    assert next(prepared.module.parameters()).device.type == "cuda"
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    inputs, _ = training.runtime.inputs(images, torch.tensor([0, 1, 0, 1]))
    with training.runtime.autocast():
        assert prepared.module(inputs).dtype == (torch.bfloat16 if bf16 else torch.float32)


def test_crops_rendered_on_the_gpu_match_the_cpu_paths_crops(tmp_path):
    """The same draws (seed, epoch, index) on both paths: the device's antialiased render is within
    1 level of 255 of torchvision's uint8 crops on the CPU (mean under 0.3)."""
    from visiontune import augment, data

    # Below the cap (twice the input size): the boxes stay in whole pixels, as on the CPU path.
    root = make_image_folder(tmp_path / "photos", {"train": 6}, size=(48, 40))
    samples = [(str(p), 0) for p in sorted((root / "train").glob("*/*.jpg"))]
    size = 32
    cpu = data.ImageFiles(samples, data.transforms(size, False)["train"], seed=7)
    gpu = data.ImageFiles(samples, data.transforms(size, True)["train"], seed=7)
    indices = range(3 * len(samples))
    rendered = augment.collate([gpu[i][0] for i in indices]).to(CUDA).render()
    assert rendered.device.type == "cuda"
    expected = torch.stack([cpu[i][0] for i in indices]).float()
    off = (rendered.cpu() - expected).abs()
    assert off.max() <= 1 and off.mean() < 0.3


def test_backbone_batch_size_auto_takes_several_batches_per_pass_on_a_gpu(standin_weights):
    """Sized from the first pass's peak memory: more than one batch at once, with the heads' outputs
    as one batch at a time gives them (close: GPU kernels may change with the batch)."""
    from helpers import prepare_model
    from visiontune.data import Normalizer
    from visiontune.frozen import FrozenBackbone
    from visiontune.runtime import Runtime

    prepared = prepare_model("squeezenet", "feature_extract", standin_weights)
    module = prepared.module.to(CUDA).eval()
    runtime = Runtime(CUDA, Normalizer(CUDA))
    backbone = FrozenBackbone(module, prepared.spec.heads)
    batches = [(torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8), torch.zeros(8)) for _ in range(6)]
    joined = [features for features, _ in backbone.batches(batches, runtime, None)]
    assert backbone.per_pass > 1
    single = FrozenBackbone(module, prepared.spec.heads)
    alone = [features for features, _ in single.batches(batches, runtime, 1)]
    for a, b in zip(joined, alone, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_compile_trains_on_the_gpu(tmp_path, tiny_folder):
    result = run_cli(
        tmp_path, "model=squeezenet", "mode=scratch", "data=imagefolder", f"data.root={tiny_folder}",
        *FAST, "compile=true", "device=cuda",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on cuda" in result.stderr and "FINISHED" in result.stderr


def test_torchrun_with_nccl_on_one_gpu(tmp_path, tiny_folder):
    result = run_cli(
        tmp_path, "--standalone", "--nproc_per_node=1", "-m", "visiontune.train", "model=squeezenet",
        "mode=scratch", "data=imagefolder", f"data.root={tiny_folder}", *FAST, "device=auto",
        module="torch.distributed.run",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on cuda:0" in result.stderr and "FINISHED" in result.stderr


def test_each_sweep_job_takes_a_gpu_of_its_own_in_turn():
    """device=auto in a sweep: job n on GPU n % count, so n_jobs = GPUs puts one job on each."""
    from visiontune import runtime

    count = torch.cuda.device_count()
    for job in range(2 * count):
        assert runtime.pick_device("auto", None, job) == torch.device("cuda", job % count)
    assert runtime.pick_device("auto", 0, None) == torch.device("cuda", 0)  # torchrun: the local rank's


def test_predict_on_cuda_gives_the_cpu_classes(tiny_sweep, tiny_folder, monkeypatch, capsys):
    out = {}
    for device in ("cpu", "cuda"):
        code, text, err = predict_here(
            tiny_sweep.cwd, "models:/ants@champion", str(tiny_folder / "val"), "--device", device, "--num-workers", "0",
            monkeypatch=monkeypatch, capsys=capsys,
        )  # fmt: skip
        assert code == 0, err[-2000:]
        out[device] = text
    cpu_rows, gpu_rows = (out[d].strip().splitlines() for d in ("cpu", "cuda"))
    assert len(cpu_rows) == len(gpu_rows) > 1
    assert [r.split(",")[:2] for r in cpu_rows] == [r.split(",")[:2] for r in gpu_rows]


def test_the_pyfunc_serves_on_cuda_as_on_the_cpu(tiny_sweep, tiny_folder):
    """What `mlflow models serve` runs, with model_config device=cuda: the CPU's answers."""
    import base64

    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(f"sqlite:///{tiny_sweep.store}")
    images = [
        base64.b64encode(p.read_bytes()).decode() for p in sorted((tiny_folder / "val").glob("*/*.jpg"))
    ]
    frame = pd.DataFrame({"image": images})
    answers = {}
    for device in ("cpu", "cuda"):
        model = mlflow.pyfunc.load_model("models:/ants@champion", model_config={"device": device})
        answers[device] = model.predict(frame)
    assert list(answers["cpu"]["class"]) == list(answers["cuda"]["class"])
    assert answers["cpu"]["probability"].to_numpy() == pytest.approx(
        answers["cuda"]["probability"].to_numpy(), abs=1e-3
    )
