"""``python -m bayesprune``: the command line (see ``bayesprune.experiments.cli``)."""

import sys

from .experiments.cli import main

if __name__ == "__main__":
    sys.exit(main())
