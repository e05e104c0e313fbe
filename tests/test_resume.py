"""resume.py: which keys of a resumed run's config differ from the checkpoint's, and which may."""

from __future__ import annotations

from visiontune import resume


def test_a_resumed_run_keeps_its_crops():
    """It changes the crops, so resume refuses a changed value (it is not a key that may differ)."""
    assert resume.differing_keys({"data.gpu_augment": "auto"}, {"data.gpu_augment": True}) == [
        "data.gpu_augment"
    ]
