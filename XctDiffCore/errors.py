"""The one exception type that reaches users as a single ``error: ...`` line (CLI exit status 2)."""


class XctDiffError(Exception):
    """A problem with the user's input or environment, explained in one readable sentence.

    The CLI prints ``error: <message>`` and exits with status 2; the Slicer module shows the message.
    Programming errors are left as ordinary exceptions so that they stay debuggable.
    """
