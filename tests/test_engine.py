"""The epoch functions: device-side tallies, and the backbone cache in evaluation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import ARCHS, SPECS, cpu_training, input_size_for, prepare_model, tiny_prepared
from visiontune import engine, runtime
from visiontune.runtime import Runtime

CPU = Runtime(torch.device("cpu"), normalize=nn.Identity())


def val_batches(model_name: str, n_batches: int = 3):
    size = input_size_for(model_name)
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(2, 3, size, size, generator=generator), torch.tensor([0, 1])) for _ in range(n_batches)
    ]


@pytest.mark.parametrize("model_name", ARCHS)
def test_backbone_cache_evaluates_exactly_like_the_full_model_and_runs_it_once(model_name, standin_weights):
    model = prepare_model(model_name, "feature_extract", standin_weights).module
    head = SPECS[model_name].head
    batches = val_batches(model_name)
    criterion = nn.CrossEntropyLoss()
    full = engine.evaluate(model, batches, criterion, CPU)

    cache = engine.BackboneCache(engine.FrozenBackbone(model, (head,)), max_bytes=2**30)
    first_layer = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    calls = []
    first_layer.register_forward_hook(lambda *_: calls.append(1))
    first = engine.evaluate(model, batches, criterion, CPU, cache=cache)
    assert len(calls) == len(batches)
    # The head trains between epochs: the cached path must see the new head.
    with torch.no_grad():
        for p in model.get_submodule(head).parameters():
            p.add_(0.05)
    changed_full = engine.evaluate(model, batches, criterion, CPU)
    calls.clear()
    second = engine.evaluate(model, batches, criterion, CPU, cache=cache)
    assert calls == [], "the backbone does not run again"
    assert (first.loss, first.acc) == (full.loss, full.acc)
    assert (second.loss, second.acc) == (changed_full.loss, changed_full.acc)


def test_backbone_cache_stops_caching_past_its_budget(standin_weights):
    model = prepare_model("resnet", "feature_extract", standin_weights).module
    # Room for one batch of two.
    cache = engine.BackboneCache(engine.FrozenBackbone(model, ("fc",)), max_bytes=2 * 512 * 4)
    engine.evaluate(model, val_batches("resnet"), nn.CrossEntropyLoss(), CPU, cache=cache)
    assert cache.cached is None


def training_batches(model_name: str):
    """Four batches, the last one short: a pass of three batches, then one of one."""
    size = input_size_for(model_name)
    generator = torch.Generator().manual_seed(1)
    sizes = (2, 2, 2, 1)
    return [(torch.randn(n, 3, size, size, generator=generator), torch.arange(n) % 2) for n in sizes]


@pytest.mark.parametrize("model_name", ARCHS)
def test_feature_extraction_on_large_backbone_batches_trains_bit_for_bit_like_the_whole_model(
    model_name, standin_weights
):
    """The frozen backbone run apart (no autograd) on three batches at once changes nothing at
    float32: the same losses and the same head weights, step by step. Dropout inside the frozen
    part (alexnet's, vgg's and squeezenet's classifiers) draws per batch, in the plain loop's
    order; inception's auxiliary head trains beside the main one."""
    batches = training_batches(model_name)
    results = []
    for split in (False, True):
        prepared = prepare_model(model_name, "feature_extract", standin_weights)
        heads = [prepared.module.get_submodule(head) for head in SPECS[model_name].heads]
        optimizer = torch.optim.SGD([p for p in prepared.module.parameters() if p.requires_grad], lr=0.1)
        training = cpu_training(prepared, optimizer)
        frozen = engine.FrozenBackbone(prepared.module, SPECS[model_name].heads) if split else None
        torch.manual_seed(3)  # the dropout draws
        result = engine.train_one_epoch(training, batches, frozen=frozen, per_pass=3)
        weights = [p.detach().clone() for head in heads for p in head.parameters()]
        results.append((result.loss, result.acc, weights, torch.rand(1)))
    (loss, acc, weights, next_draw), (split_loss, split_acc, split_weights, split_next_draw) = results
    assert (split_loss, split_acc) == (loss, acc)
    assert all(torch.equal(a, b) for a, b in zip(weights, split_weights, strict=True))
    assert torch.equal(next_draw, split_next_draw), "the random stream was drawn from alike"


def test_precision_auto_is_bf16_where_the_hardware_computes_it():
    cpu = torch.device("cpu")
    assert runtime.precision_for("off", cpu) is None
    assert runtime.precision_for("bf16", cpu) == torch.bfloat16
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    assert runtime.precision_for("auto", cpu) == (torch.bfloat16 if native else None)


def test_tallies_average_over_images_not_batches():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([1.0, 0.0]))  # always predicts class 0
    batches = [(torch.zeros(3, 3), torch.tensor([0, 0, 1])), (torch.zeros(1, 3), torch.tensor([1]))]
    result = engine.evaluate(model, batches, nn.CrossEntropyLoss(), CPU)
    assert result.acc == pytest.approx(2 / 4)


@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_autocast_and_channels_last_train_on_cpu(channels_last):
    prepared = prepare_model("resnet", "scratch")
    model = prepared.module.to(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
    runtime = Runtime(torch.device("cpu"), nn.Identity(), torch.bfloat16, channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    before = model.fc.weight.clone()
    training = cpu_training(prepared, optimizer, runtime=runtime)
    result = engine.train_one_epoch(training, val_batches("resnet"))
    assert torch.isfinite(torch.tensor(result.loss)) and not torch.equal(before, model.fc.weight)
    assert model.fc.weight.dtype == torch.float32, "autocast keeps the weights in float32"


def test_fit_restores_the_best_epochs_weights_and_reports_each_epoch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    prepared = tiny_prepared(model)
    images = torch.randn(8, 3, 2, 2)
    loaders = {"train": [(images, torch.tensor([0, 1] * 4))], "val": [(images, torch.tensor([0, 1] * 4))]}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    reports, snapshots = [], {}

    def on_epoch(report, progress):
        reports.append(report)
        snapshots[report.epoch] = {k: v.clone() for k, v in model.state_dict().items()}

    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    training = cpu_training(prepared, optimizer, epochs=4, scheduler=scheduler)
    result = engine.fit(training, loaders, on_epoch=on_epoch)
    assert [r.epoch for r in reports] == [1, 2, 3, 4]
    assert [r.lrs["0"] for r in reports] == [0.5, 0.25, 0.125, 0.0625], "the lr each epoch trained with"
    assert result.val_curve == [r.val.acc for r in reports]
    assert result.best_acc == max(result.val_curve)
    assert result.best_epoch == result.val_curve.index(result.best_acc) + 1
    assert result.best_epoch < 4, "the case where restoring matters: training went on after the best epoch"
    for key, value in model.state_dict().items():
        assert torch.equal(value, snapshots[result.best_epoch][key])


def test_a_nonfinite_training_loss_stops_fit_naming_epoch_and_batch():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    prepared = tiny_prepared(model)
    images, labels = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 0, 1])
    broken = torch.full_like(images, float("inf"))  # what an overflowing forward pass hands the loss
    loaders = {"train": [(images, labels), (broken, labels), (images, labels)], "val": [(images, labels)]}
    training = cpu_training(prepared, torch.optim.SGD(model.parameters(), lr=0.1), epochs=3)
    reports = []
    with pytest.raises(engine.NonFiniteLoss, match="in epoch 1, first at batch 2 of 3") as stopped:
        engine.fit(training, loaders, on_epoch=lambda report, progress: reports.append(report))
    assert "lower optimizer.lr (it is 0.1)" in str(stopped.value)
    assert reports == [], "no epoch with a non-finite loss is reported, let alone kept as best"


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
    with pytest.raises(engine.VisiontuneError, match="every rank on one GPU"):
        runtime.choose_device("cuda:0", 2, 1, None)


def test_compile_trains_the_models_own_weights_like_the_plain_loop():
    """compile=true: torch.compile'd training and validation update and score the same module,
    to float rounding."""
    images = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    loaders = {"train": [(images, torch.tensor([0, 1] * 4))], "val": [(images, torch.tensor([0, 1] * 4))]}
    results = []
    torch._dynamo.reset()
    for compile in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(48, 2))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        training = dataclasses.replace(
            cpu_training(tiny_prepared(model), optimizer, epochs=2), compile=compile
        )
        curve = engine.fit(training, loaders).val_curve
        results.append((curve, [p.detach().clone() for p in model.parameters()]))
    (curve, weights), (compiled_curve, compiled_weights) = results
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2, "training and validation compiled"
    assert compiled_curve == curve
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(weights, compiled_weights, strict=True))
