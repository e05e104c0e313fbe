"""A lost MLflow server: one deadline for the whole process, not one retry chain per store call.

MLflow's client retries each request for about 4 minutes (MLFLOW_HTTP_REQUEST_MAX_RETRIES, 7,
with doubling pauses): a server that restarts loses nothing. But a run whose server is gone for
good then fails its next write after those 4 minutes, and every write on its way out (the log
file, the error tag, the FAILED status) waited 4 minutes more: 12 minutes and more without a line.
Once one request has used up its whole chain, the server is taken as gone: each further request
is tried once, with a short timeout, until one gets through again.
"""

from __future__ import annotations

import os
import time

import mlflow

from visiontune.store.location import is_server

# What MLflow reads on every request (mlflow.utils.rest_utils.http_request and the artifact
# repository), so that setting them here changes the very next call.
RETRIES, TIMEOUT = "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"
# One try while the server is gone: long enough for a server that is back to answer.
GONE_TIMEOUT_SECONDS = 10

# The fault texts of a request that never reached a server (urllib3 and requests, in MLflow's words).
_UNREACHABLE = ("Max retries exceeded", "Connection refused", "Connection aborted", "timed out")

_gone_since: float | None = None
_saved: dict[str, str | None] = {}


def unreachable(err: BaseException) -> bool:
    """Whether `err` is a tracking server that did not answer at all (not one that refused a write)."""
    if not is_server(mlflow.get_tracking_uri()):
        return False
    texts, inner = [], err
    while inner is not None and len(texts) < 8:
        texts.append(str(inner))
        inner = inner.__cause__ or inner.__context__
    return any(fault in text for text in texts for fault in _UNREACHABLE)


def note(err: BaseException) -> None:
    """After a failed store call: a server that did not answer is gone, and stops being retried."""
    global _gone_since
    if _gone_since is not None or not unreachable(err):
        return
    _gone_since = time.time()
    _saved.update({key: os.environ.get(key) for key in (RETRIES, TIMEOUT)})
    os.environ[RETRIES] = "0"
    os.environ[TIMEOUT] = str(GONE_TIMEOUT_SECONDS)


def answered() -> None:
    """After a store call that got through: the server is back, and retried as MLflow does again."""
    global _gone_since
    if _gone_since is None:
        return
    _gone_since = None
    for key, value in _saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _saved.clear()


def gone_since() -> float | None:
    """When the server stopped answering (time.time()), or None while it answers."""
    return _gone_since
