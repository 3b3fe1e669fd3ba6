"""The ``xctdiff`` program's first lines: Ctrl-C while the command line is still being imported (or while a
network command restarts with its memory policy) is the same one ``error: interrupted`` line as later,
not a traceback of whatever import it hit. Imports nothing itself, so that the window before this
handler is the interpreter's own start-up."""
import sys

#: The exit status of a command Ctrl-C stopped (128 + SIGINT), where the process cannot die of the signal.
INTERRUPTED = 130


def entry_point() -> int:
    try:
        from .cli import entry_point as run

        status = run()
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        status = INTERRUPTED
    if status == INTERRUPTED:
        die_interrupted()
    return status


def die_interrupted() -> None:
    """End the process as one that Ctrl-C killed, once its clean-up is done and its last line written (as
    Python itself does after an uncaught KeyboardInterrupt). An exit status of 130 reads to a shell as a
    Ctrl-C the program handled: a loop or script running ``xctdiff`` went on to its next command (the next
    training stage, the next patient) instead of stopping with it. POSIX only; elsewhere the caller exits 130."""
    import os
    import signal

    if os.name != "posix":
        return
    flush_standard_streams()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)  # delivered to this (unblocked) thread before kill() returns


def flush_standard_streams() -> None:
    """Write out what stdout and stderr still hold, before the process ends without Python's own teardown."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more to say
            pass
