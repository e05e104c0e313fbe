"""sharing.py: a sweep's jobs in one process share decoded images and frozen-backbone outputs, and
train bit for bit as they would in a fresh process; another size, file or budget never hits."""

from __future__ import annotations

import os

import pytest

from helpers import compose_cfg, make_image_folder
from visiontune import sharing


@pytest.fixture
def photos(tmp_path):
    """Real JPEGs larger than the input, so that decoding caps and val resizes do work."""
    return make_image_folder(tmp_path / "photos", {"train": 8, "val": 6}, size=(96, 80))


@pytest.fixture(autouse=True)
def fresh_process():
    """No entry from another test: each test starts as a new process would."""
    sharing.clear()
    yield
    sharing.clear()


def _job(tmp_path, root, weights, mode: str, lr: float):
    """One job's set-up and fit as pipeline.train runs them (without the MLflow record): every
    epoch's losses and accuracies, and the set-up, to see what it took from earlier jobs."""
    import torch

    from visiontune import config, engine, pipeline
    from visiontune.config import Job

    cfg = compose_cfg(
        "model=squeezenet",
        f"mode={mode}",
        "data=imagefolder",
        f"data.root={root}",
        f"model.weights={weights}",
        f"optimizer.lr={lr}",
        *("epochs=1", "num_workers=0", "batch_size=4", "model.input_size=64", "device=cpu"),
    )
    settings = config.read(cfg)
    job = Job(tmp_path, tmp_path, tmp_path / "x.log", {}, [], None, None, started=0.0)
    setup = pipeline.set_up(settings, job, torch.device("cpu"))
    reports = []
    engine.fit(setup.training, setup.loaders, on_epoch=lambda report, progress: reports.append(report))
    weights_after = {k: v.clone() for k, v in setup.prepared.module.state_dict().items()}
    curves = [(r.train.loss, r.train.acc, r.val.loss, r.val.acc) for r in reports]
    return setup, curves, weights_after


@pytest.mark.parametrize(
    ("first_mode", "mode"),
    [("feature_extract", "feature_extract"), ("finetune", "finetune"), ("finetune", "feature_extract")],
)
def test_a_second_job_shares_and_trains_bit_for_bit_as_a_fresh_one(
    tmp_path, photos, standin_weights, first_mode, mode
):
    """Job B after job A (same data and architecture, another lr) takes A's decoded training images,
    and A's val batches (A fine-tunes) or frozen-backbone val outputs (both extract features); its
    losses, accuracies and final weights equal those of B run alone in a fresh process."""
    import torch

    weights = standin_weights("squeezenet1_0")
    first, _, _ = _job(tmp_path, photos, weights, first_mode, lr=0.001)
    made = {key: value for key, (value, _) in sharing._held.items()}
    second, shared_curves, shared_weights = _job(tmp_path, photos, weights, mode, lr=0.01)

    # A made two entries, the decoded training images and the val batches (finetune) or the
    # frozen backbone's val outputs (feature_extract): B took both as they were, and made none
    # anew but, after a fine-tuning job, its own backbone outputs.
    assert len(made) == 2 and all(sharing._held[key][0] is value for key, value in made.items())
    assert len(sharing._held) == 2 + (first_mode != mode)
    assert second.loaders["train"].loader.dataset.decoded is first.loaders["train"].loader.dataset.decoded
    if first_mode == "finetune":
        assert second.loaders["val"].batches is first.loaders["val"].batches

    sharing.clear()
    _, fresh_curves, fresh_weights = _job(tmp_path, photos, weights, mode, lr=0.01)
    assert shared_curves == fresh_curves
    for name, tensor in fresh_weights.items():
        assert torch.equal(tensor, shared_weights[name]), name


def _decoded(root, input_size: int, budget: int = 2**30):
    from visiontune import data

    sharing.set_budget(budget)
    checked = data.check_folder(root, False, None)
    settings = data.LoaderSettings(
        input_size=input_size, batch_size=4, num_workers=0, seed=0, train_cache_bytes=budget
    )
    return data.build_loaders(checked.samples, settings)["train"].loader.dataset.decoded


def test_another_input_size_or_a_changed_file_is_decoded_anew(tmp_path):
    """The key holds the decode size and every file's size, time and inode: a job at another input
    size, or after an image was rewritten, never takes a stale decode."""
    root = make_image_folder(tmp_path / "big", {"train": 4, "val": 2}, size=(400, 300))
    at_64 = _decoded(root, 64)
    assert _decoded(root, 64) is at_64
    at_128 = _decoded(root, 128)
    assert at_128 is not at_64 and min(at_128[0].shape[1:]) == 256 and min(at_64[0].shape[1:]) == 128

    touched = next((root / "train" / "ants").iterdir())
    os.utime(touched, ns=(0, 0))
    assert _decoded(root, 64) is not at_64


def test_what_is_held_stays_within_the_latest_budget(tmp_path):
    """Entries beyond the budget of the job starting now go, least recently used first; one larger
    than the budget is never held."""
    sharing.set_budget(100)
    sharing.put("a", "A", 60)
    sharing.put("b", "B", 30)
    assert sharing.get("a") == "A"  # now the most recently used
    sharing.put("c", "C", 30)  # 120 > 100: b, the least recently used, goes
    assert (sharing.get("b"), sharing.get("a"), sharing.get("c")) == (None, "A", "C")
    sharing.put("d", "D", 101)
    assert sharing.get("d") is None
    sharing.set_budget(50)  # a later job with a smaller data.cache_mb
    assert sharing.held_bytes() <= 50 and sharing.get("c") == "C"
    sharing.make_room(40)  # before a cache of up to 40 is built: c goes, 30 + 40 > 50
    assert sharing.held_bytes() == 0
