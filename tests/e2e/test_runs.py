"""A run's process, as visiontune-runs tells it: alive, dead, or unknown (real processes)."""

from __future__ import annotations

import os

from visiontune import store


def test_a_runs_process_is_told_alive_dead_or_unknown():
    """visiontune-runs and resume= tell a ghost run from one in progress by its host:pid tag."""
    import socket
    import subprocess
    import sys

    host = socket.gethostname()
    assert store.process_state(None) == store.process_state(f"elsewhere:{os.getpid()}") == "unknown"
    # Each child says when it is running its own program: until then its command line is still
    # this process's (fork before exec), which a loaded machine leaves in view for a while.
    sleep = [sys.executable, "-c", "import time; print(flush=True); time.sleep(60)"]
    with (
        subprocess.Popen([*sleep, "visiontune"], stdout=subprocess.PIPE) as ours,
        subprocess.Popen(sleep, stdout=subprocess.PIPE) as other,
    ):
        try:
            ours.stdout.readline(), other.stdout.readline()
            assert store.process_state(f"{host}:{ours.pid}") == "alive"
            assert store.process_state(f"{host}:{other.pid}") == "dead", "a reused pid: another program"
        finally:
            ours.kill()
            other.kill()
    assert store.process_state(f"{host}:{ours.pid}") == "dead"
