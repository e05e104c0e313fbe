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
