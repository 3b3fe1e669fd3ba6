"""The one exception type that reaches users as a single ``error: ...`` line (CLI exit status 2)."""


class XctDiffError(Exception):
    """A problem with the user's input or environment, explained in one readable sentence.

    The CLI prints ``error: <message>`` and exits with status 2; the Slicer module shows the message.
    Programming errors are left as ordinary exceptions so that they stay debuggable.
    """


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of a library's exception, for an :class:`XctDiffError` sentence (torch and numpy messages
    run over many lines); the exception's type when it says nothing."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]
