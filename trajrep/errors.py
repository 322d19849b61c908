"""One exception type for problems a user can fix (bad config, missing files).

The entry points print these as a single line instead of a traceback; everything else is a bug and keeps its
traceback.
"""

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

DEBUG_ENV = "TRAJREP_DEBUG"


class TrajrepError(ValueError):
    """A user-facing error whose message says what is wrong and how to fix it."""

    #: The most recent instance. jsonargparse re-raises errors from class constructors as a new ValueError that
    #: only quotes their text; `user_error` uses this to recover the original.
    latest: "TrajrepError | None" = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        TrajrepError.latest = self


def user_error(error: BaseException) -> TrajrepError | None:
    """The TrajrepError behind `error`: itself, one in its cause/context chain, or one whose text it quotes."""
    seen = error
    while seen is not None:
        if isinstance(seen, TrajrepError):
            return seen
        seen = seen.__cause__ or seen.__context__
    latest = TrajrepError.latest
    if latest is not None and str(latest) in str(error):
        return latest
    if type(error).__name__ == "MisconfigurationException":  # Lightning's word for a Trainer setting it refuses
        return TrajrepError(f"{error} (a Trainer setting: check --trainer.accelerator, devices, strategy and "
                            "precision; `trajrep fit --help`)")
    return None


def one_line(message: str) -> str:
    """The message itself; for an error re-raised from a DataLoader worker (whose text is the worker's whole
    traceback), the original error's own line."""
    if "in DataLoader worker process" not in message:
        return message
    last = message.strip().splitlines()[-1]
    return last.split(": ", 1)[1] if last.startswith(f"{__name__}.TrajrepError: ") else last


@contextmanager
def errors_as_one_line() -> Iterator[None]:
    """For entry points: a user-fixable error ends as one line on stderr and exit code 2 (TRAJREP_DEBUG=1 shows
    the traceback); any other exception keeps its traceback."""
    try:
        yield
    except Exception as error:
        cause = user_error(error)
        if cause is None or os.environ.get(DEBUG_ENV):
            raise
        print(f"trajrep: error: {one_line(str(cause))}", file=sys.stderr)
        sys.exit(2)
