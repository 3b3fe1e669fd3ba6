"""``python -m XctDiffCore`` is the same as the ``xctdiff`` command."""
import sys

from .commands.launcher import entry_point

if __name__ == "__main__":
    sys.exit(entry_point())
