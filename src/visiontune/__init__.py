"""visiontune: fine-tune torchvision image classifiers from Hydra configs, tracked in MLflow."""

import re
import time

__version__ = "0.1.0"

# Where start-up is counted from when the OS does not say when the process began (pipeline.startup_began).
IMPORTED_AT = time.monotonic()


class VisiontuneError(Exception):
    """A problem with the user's input: the message says what is wrong and how to fix it."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (what SLURM, Kubernetes and `timeout` send): stop as on Ctrl-C, exit 143."""


class Stopped(KeyboardInterrupt):
    """The run cannot go on for a cause outside it (a lost torchrun peer, a full disk): it ends
    KILLED and resumable, as on Ctrl-C, and the command says why in one line and exits 1."""


# Another library's error quoted inside our own message: enough to name the cause, never a wall.
CAUSE_LIMIT = 500


def user_message(err: BaseException) -> str:
    """The error's own text, without the traceback a DataLoader worker wraps around it, redacted."""
    text = str(err) or type(err).__name__
    marker = f"{type(err).__name__}: "
    if "Original Traceback" in text and marker in text:
        text = text.rsplit(marker, 1)[1]
    return redact(text.strip())


# user:password in a URI, and query parameters that carry a secret (?token=..., &api_key=...).
_USERINFO = re.compile(r"(\b[a-zA-Z][\w+.-]*://)([^/@\s:]*):([^/@\s]*)@")
_SECRET_QUERY = re.compile(
    r"([?&](?:[\w.-]*token|[\w.-]*key|password|passwd|secret|sig|signature|auth)=)[^&#\s'\"]+", re.IGNORECASE
)


def redact(text: str) -> str:
    """`text` with credentials in URIs replaced by ***: what may be printed, tagged or logged."""
    return _SECRET_QUERY.sub(r"\1***", _USERINFO.sub(r"\1\2:***@", text))


def is_fraction(value) -> bool:
    """Whether a config value is a number from 0 up to (not including) 1: bools, which YAML reads
    from true/false and Python counts as ints, are not."""
    return not isinstance(value, bool) and isinstance(value, int | float) and 0 <= value < 1
