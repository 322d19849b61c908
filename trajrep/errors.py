"""One exception type for problems a user can fix (bad config, missing files).

The CLI prints these as a single line instead of a traceback; everything else is a bug and keeps its traceback.
"""


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
    return latest if latest is not None and str(latest) in str(error) else None
