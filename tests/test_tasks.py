"""tasks.py and the balanced sampler: class weights and draws on a 10:1 folder, the metrics by hand."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from helpers import make_image_folder
from visiontune import data, tasks


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory):
    """20 ants and 2 bees (10:1) to train on."""
    root = tmp_path_factory.mktemp("imbalanced")
    make_image_folder(root, {"train": 20, "val": 2}, classes=("ants",), size=(16, 16))
    make_image_folder(root, {"train": 2, "val": 1}, classes=("bees",), size=(16, 16))
    return data.check_folder(root, False)


def test_auto_class_weights_are_inverse_frequency(imbalanced):
    labels = [label for _, label in imbalanced.samples["train"]]
    assert Counter(labels) == {0: 20, 1: 2}
    weights = tasks.class_weights(labels, 2)
    # n / (classes * count): 22 / 40 and 22 / 4; a balanced split would weigh each class 1.
    assert weights.tolist() == pytest.approx([0.55, 5.5])
    loss = tasks.criterion(False, 0.0, weights)
    assert torch.equal(loss.weight, weights)


def test_balanced_sampler_draws_each_class_equally_and_exactly_again(imbalanced):
    labels = [label for _, label in imbalanced.samples["train"]]
    draws = Counter()
    for epoch in range(1, 201):
        sampler = data.BalancedDraw(labels, seed=4)
        sampler.set_epoch(epoch)
        draws.update(labels[i % len(labels)] for i in sampler)
    share = draws[1] / sum(draws.values())
    assert 0.45 < share < 0.55  # ~1/2 each, where shuffling gives the bees 2/22
    resumed = data.BalancedDraw(labels, seed=4)
    resumed.set_epoch(200)
    assert list(resumed) == list(sampler)  # (seed, epoch) alone: a resumed run draws the same


def test_balanced_sampler_shards_one_draw_over_ranks(imbalanced):
    labels = [label for _, label in imbalanced.samples["train"]]
    whole = data.BalancedDraw(labels, seed=4)
    shards = [data.BalancedDraw(labels, seed=4, rank=r, world=2) for r in range(2)]
    for sampler in (whole, *shards):
        sampler.set_epoch(3)
    assert sorted(list(shards[0]) + list(shards[1])) == sorted(whole)
    assert len(shards[0]) == len(shards[1]) == 11


def test_confusion_metrics_by_hand():
    counts = torch.tensor([[8, 2], [1, 1]])  # rows true: 10 ants (8 found), 2 bees (1 found)
    metrics = tasks.confusion_metrics(counts, ["ants", "bees"])
    assert metrics["acc"] == pytest.approx(9 / 12)
    assert metrics["balanced_acc"] == pytest.approx((0.8 + 0.5) / 2)
    assert metrics["f1_bees"] == pytest.approx(2 * 1 / (2 + 3))
    assert metrics["macro_f1"] == pytest.approx((16 / 19 + 2 / 5) / 2)
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert tasks.confusion(logits, torch.tensor([0, 0, 1]), 2).tolist() == [[1, 1], [1, 0]]


def test_multilabel_metrics_by_hand():
    scores = torch.tensor([[0.9, 0.2], [0.6, 0.7], [0.1, 0.8]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # label 0: ranked 0.9 (hit), 0.6 (miss), 0.1 (hit): AP = (1 + 2/3) / 2; label 1: two hits first: AP 1.
    assert tasks.average_precision(scores, targets).tolist() == pytest.approx([5 / 6, 1.0])
    metrics = tasks.multilabel_metrics(scores, targets, threshold=0.5)
    assert metrics["mAP"] == pytest.approx((5 / 6 + 1) / 2)
    # at 0.5: label 0 tp 1 fp 1 fn 1; label 1 tp 2 fp 0 fn 0
    assert metrics["micro_f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    assert metrics["macro_f1"] == pytest.approx((0.5 + 1.0) / 2)
    loss = tasks.criterion(True, 0.0, tasks.class_weights([(0,), (0, 1), (0,)], 2, multilabel=True), 0.3)
    assert loss.threshold == 0.3 and loss.pos_weight.tolist() == [0.0, 2.0]


def test_balanced_loader_gives_the_rare_class_about_half_the_batches(imbalanced):
    sampled = data.LoaderSettings(input_size=16, batch_size=11, num_workers=0, seed=2, sampler="balanced")
    loader = data.build_loaders(imbalanced.samples, sampled)["train"]
    assert isinstance(loader.loader.sampler, data.BalancedDraw)
    labels = []
    for epoch in range(1, 11):
        loader.set_epoch(epoch)
        labels += [label for _, batch in loader for label in batch.tolist()]
    assert len(labels) == 220 and 0.35 < labels.count(1) / len(labels) < 0.65  # shuffled: 2/22
