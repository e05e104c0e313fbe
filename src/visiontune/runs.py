"""Whether the process that writes a run is still alive, from the host:pid tag visiontune gives it.

MLflow cannot tell a run left RUNNING by a dead process from a run in progress. Training refuses
to resume a run a live process still writes (checkpoint.refuse_if_training), and visiontune-runs
lists the dead ones; both ask here.
"""

from __future__ import annotations

import socket
from pathlib import Path


def process_state(tag: str | None) -> str:
    """dead, alive, or unknown (another host, or a run visiontune did not start) for a host:pid tag."""
    host, _, pid = (tag or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return "unknown"
    cmdline = Path(f"/proc/{pid}/cmdline")
    try:
        # A reused pid belongs to another program. A sweep job that submitit started runs as
        # `python -m submitit.core._submit <folder>`, without visiontune in its command line.
        command = cmdline.read_bytes()
        alive = b"visiontune" in command or b"submitit" in command
    except OSError:
        return "dead"
    return "alive" if alive else "dead"
