"""resume.py: which keys of a resumed run's config differ from the checkpoint's, and which may."""

from __future__ import annotations

from visiontune import resume


def test_a_resumed_run_keeps_its_crops():
    """It changes the crops, so resume refuses a changed value (it is not a key that may differ)."""
    assert resume.differing_keys({"data.gpu_augment": "auto"}, {"data.gpu_augment": True}) == [
        "data.gpu_augment"
    ]


def test_a_requeued_sweep_job_counts_as_started_before(tmp_path, monkeypatch):
    """SLURM counts a requeued job's restarts; submitit_local's restart shows as the job's checkpoint."""
    from visiontune.config import Job
    from visiontune.resume import started_before

    job = Job(tmp_path, tmp_path / "0", tmp_path / "0" / "train.log", {}, [], 0, tmp_path, started=0.0)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert not started_before(job)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert not started_before(job)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert started_before(job)
    monkeypatch.delenv("SLURM_RESTART_COUNT")
    (tmp_path / "0" / "checkpoints").mkdir(parents=True)
    (tmp_path / "0" / "checkpoints" / "last.pt").write_bytes(b"")
    assert started_before(job)
