"""The frozen backbone: its stem run apart bit for bit like the whole model, and its evaluation cache."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import ARCHS, SPECS, cpu_training, input_size_for, prepare_model, val_batches
from visiontune import engine
from visiontune.frozen import BackboneCache, FrozenBackbone
from visiontune.runtime import Runtime

CPU = Runtime(torch.device("cpu"), normalize=nn.Identity())


@pytest.mark.parametrize("model_name", ARCHS)
def test_backbone_cache_evaluates_exactly_like_the_full_model_and_runs_it_once(model_name, standin_weights):
    model = prepare_model(model_name, "feature_extract", standin_weights).module
    head = SPECS[model_name].head
    batches = val_batches(model_name)
    criterion = nn.CrossEntropyLoss()
    full = engine.evaluate(model, batches, criterion, CPU)

    cache = BackboneCache(FrozenBackbone(model, (head,)), max_bytes=2**30)
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
    cache = BackboneCache(FrozenBackbone(model, ("fc",)), max_bytes=2 * 512 * 4)
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
        frozen = FrozenBackbone(prepared.module, SPECS[model_name].heads) if split else None
        torch.manual_seed(3)  # the dropout draws
        result = engine.train_one_epoch(training, batches, frozen=frozen, per_pass=3)
        weights = [p.detach().clone() for head in heads for p in head.parameters()]
        results.append((result.loss, result.acc, weights, torch.rand(1)))
    (loss, acc, weights, next_draw), (split_loss, split_acc, split_weights, split_next_draw) = results
    assert (split_loss, split_acc) == (loss, acc)
    assert all(torch.equal(a, b) for a, b in zip(weights, split_weights, strict=True))
    assert torch.equal(next_draw, split_next_draw), "the random stream was drawn from alike"
