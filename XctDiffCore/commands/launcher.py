"""The ``xctdiff`` program's first lines: Ctrl-C while the command line is still being imported (or while a
network command restarts with its memory policy) is the same one ``error: interrupted`` line as later,
not a traceback of whatever import it hit. Imports nothing itself, so that the window before this
handler is the interpreter's own start-up."""
import sys


def entry_point() -> int:
    try:
        from .cli import entry_point as run

        return run()
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
