"""commands/evaluate.py in this process: precision, recall and F1 from a confusion, metric keys per
class. The command against a real training run: tests/e2e/test_evaluate.py."""

from __future__ import annotations

import math

import pytest
import torch

from visiontune.commands import evaluate


def test_scores_match_a_confusion_worked_out_by_hand():
    # True class per row, predicted per column:   ants  bees  wasps  moths (never in the folder)
    #                                        ants    3     1     0      0
    #                                        bees    1     2     0      1
    #                                       wasps    0     0     2      0
    confusion = [[3, 1, 0, 0], [1, 2, 0, 1], [0, 0, 2, 0], [0, 0, 0, 0]]
    pairs = [(t, p) for t, row in enumerate(confusion) for p, n in enumerate(row) for _ in range(n)]
    targets, predicted = torch.tensor(pairs).T

    result = evaluate.scores(targets, predicted, num_classes=4)

    assert result.confusion.tolist() == confusion
    assert result.accuracy == pytest.approx(7 / 10)
    assert result.support.tolist() == [4, 4, 2, 0]
    # precision = TP / predicted as the class; recall = TP / images of the class
    assert result.precision.tolist() == pytest.approx([3 / 4, 2 / 3, 2 / 2, 0 / 1])
    assert result.recall[:3].tolist() == pytest.approx([3 / 4, 2 / 4, 2 / 2])
    # F1 = 2PR / (P + R): ants 0.75; bees 2(2/3)(1/2) / (7/6) = 4/7; wasps 1
    assert result.f1[:3].tolist() == pytest.approx([0.75, 4 / 7, 1.0])
    # moths: no images, so no recall or F1, and left out of the macro mean
    assert math.isnan(result.recall[3]) and math.isnan(result.f1[3])
    assert result.macro_f1 == pytest.approx((0.75 + 4 / 7 + 1.0) / 3)


def test_a_class_never_predicted_has_no_precision_and_zero_f1():
    result = evaluate.scores(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 0, 0]), num_classes=2)
    assert result.precision[0].item() == pytest.approx(0.5) and math.isnan(result.precision[1])
    assert result.recall.tolist() == [1.0, 0.0]
    assert result.f1.tolist() == pytest.approx([2 / 3, 0.0])
    assert result.macro_f1 == pytest.approx(1 / 3)


def test_class_names_become_distinct_metric_keys():
    keys = evaluate.metric_keys(["a+b", "a?b", "golden retriever", "Café", "n/a.1-x"])
    assert keys == ["a_b", "a_b_", "golden retriever", "Café", "n/a.1-x"]
