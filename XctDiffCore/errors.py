"""The one exception type that reaches users as a single ``error: ...`` line (CLI exit status 2)."""
import sys
import warnings


class XctDiffError(Exception):
    """A problem with the user's input or environment, explained in one readable sentence.

    The CLI prints ``error: <message>`` and exits with status 2; the Slicer module shows the message.
    Programming errors are left as ordinary exceptions so that they stay debuggable.
    """


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of a library's exception, for an :class:`XctDiffError` sentence (torch and numpy messages
    run over many lines); the exception's type when it says nothing."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]


def a_few(names, most: int = 3) -> str:
    """``a, b, c and 4 more``: the first ``most`` names of a long list, for a one-line message."""
    names = list(names)
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def counted(n: int, one: str, many: str = "") -> str:
    """``1 pair``, ``2 pairs`` (``many``: a plural other than ``one`` + s)."""
    return f"{n} {one if n == 1 else many or one + 's'}"


def warn_caller(message: str, category: type = UserWarning) -> None:
    """``warnings.warn`` naming the first line outside XctDiffCore that led here (a script's or a notebook
    cell's ``pipe.reconstruct(...)``), however many engine frames lie between: a counted ``stacklevel`` named
    the engine's own line whenever a call went through one more or one fewer of them."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] == "XctDiffCore":
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
