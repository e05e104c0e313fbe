"""checkpoint.py: what reading a checkpoint says when the file is not whole."""

from __future__ import annotations

import pytest

from visiontune import VisiontuneError, checkpoint


def test_an_empty_checkpoint_says_it_is_empty(tmp_path):
    (tmp_path / checkpoint.LAST).write_bytes(b"")
    with pytest.raises(VisiontuneError, match=r"last.pt is empty \(0 bytes\): it was truncated") as raised:
        checkpoint.read(tmp_path)
    assert "()" not in str(raised.value)


def test_a_cut_checkpoint_says_it_is_damaged(tmp_path):
    (tmp_path / checkpoint.LAST).write_bytes(b"PK\x03\x04 not the whole file")
    with pytest.raises(VisiontuneError, match="cannot be read .*: it is damaged"):
        checkpoint.read(tmp_path)


def bn_training(epochs: int, lr: float, **loop):
    """A small model with batch norm (float buffers and a counter) on the CPU, with `loop` options."""
    import dataclasses

    import torch
    from torch import nn

    from helpers import cpu_training, tiny_prepared
    from visiontune.ema import WeightAverage

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(12, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)))
    training = cpu_training(tiny_prepared(model), torch.optim.SGD(model.parameters(), lr=lr), epochs=epochs)
    return dataclasses.replace(training, ema=WeightAverage(model, decay=0.9), **loop)


def fake_loaders():
    import torch

    images = torch.randn(8, 3, 2, 2, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1] * 4)
    return {"train": [(images[:4], labels[:4]), (images[4:], labels[4:])], "val": [(images, labels)]}


def saving(folder, training):
    return lambda report, progress: checkpoint.save(
        folder, training, progress, {"run_id": "x", "config": {}, "metrics": []}
    )


def test_a_resumed_fit_continues_the_moving_average_and_the_patience_exactly(tmp_path):
    import torch

    from visiontune import engine

    whole, reports = bn_training(epochs=3, lr=0.5), []
    whole_result = engine.fit(whole, fake_loaders(), on_epoch=lambda r, p: reports.append((r, p)))
    first = bn_training(epochs=2, lr=0.5)
    engine.fit(first, fake_loaders(), on_epoch=saving(tmp_path, first))
    again, resumed = bn_training(epochs=3, lr=0.5), []
    progress = checkpoint.restore(checkpoint.read(tmp_path), again)
    result = engine.fit(again, fake_loaders(), lambda r, p: resumed.append((r, p)), progress)
    (last, last_progress), (resumed_last, resumed_progress) = reports[-1], resumed[0]
    assert resumed_last.val_ema == dataclasses_replace_seconds(last.val_ema, resumed_last.val_ema)
    for key, value in whole.ema.state_dict().items():
        assert torch.equal(value, again.ema.state_dict()[key]), f"the average's {key}"
    fields = ("watched", "waited", "best_from", "best_acc", "best_epoch", "curve")
    assert [getattr(resumed_progress, f) for f in fields] == [getattr(last_progress, f) for f in fields]
    assert (result.best_acc, result.best_from) == (whole_result.best_acc, whole_result.best_from)


def dataclasses_replace_seconds(expected, got):
    """`expected` with `got`'s seconds: times differ between runs, nothing else may."""
    import dataclasses

    return dataclasses.replace(expected, seconds=got.seconds)


def test_a_resumed_run_stops_early_at_the_epoch_the_whole_run_stops(tmp_path):
    from visiontune import engine

    whole = engine.fit(bn_training(epochs=10, lr=0.0, patience=2), fake_loaders())
    assert whole.stopped_early.startswith("early stopping after epoch 3 of 10")
    first = bn_training(epochs=2, lr=0.0, patience=2)  # stopped after epoch 2, one epoch waited
    engine.fit(first, fake_loaders(), on_epoch=saving(tmp_path, first))
    again, epochs = bn_training(epochs=10, lr=0.0, patience=2), []
    progress = checkpoint.restore(checkpoint.read(tmp_path), again)
    result = engine.fit(again, fake_loaders(), lambda r, p: epochs.append(r.epoch), progress)
    assert epochs == [3] and result.stopped_early == whole.stopped_early
