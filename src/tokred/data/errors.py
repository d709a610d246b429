"""The error every dataset problem is reported as: one line that names the fix."""

from __future__ import annotations


class DatasetError(ValueError):
    """A dataset that cannot be used as configured (missing root, empty or unreadable files, class mismatch).

    Raised inside a DataLoader worker, torch re-raises it in the main process as ``DatasetError(<formatted worker
    traceback>)``; the constructor keeps only the original message so the command line still prints one line.
    """

    def __init__(self, message: str) -> None:
        if "Original Traceback" in message:
            last = message.rstrip().splitlines()[-1]
            message = last.split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)
