"""``python -m bayesprune``: the command line (see ``bayesprune.cli``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
