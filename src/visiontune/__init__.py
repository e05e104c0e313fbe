"""visiontune: fine-tune torchvision image classifiers from Hydra configs, tracked in MLflow."""

__version__ = "0.1.0"


class VisiontuneError(Exception):
    """A problem with the user's input: the message says what is wrong and how to fix it."""


# Another library's error quoted inside our own message: enough to name the cause, never a wall.
CAUSE_LIMIT = 500


def user_message(err: BaseException) -> str:
    """The error's own text, without the traceback a DataLoader worker wraps around it."""
    text = str(err) or type(err).__name__
    marker = f"{type(err).__name__}: "
    if "Original Traceback" in text and marker in text:
        text = text.rsplit(marker, 1)[1]
    return text.strip()
