"""The ``bayesprune`` console script: :func:`bayesprune.experiments.cli.main`, started so that a
Ctrl-C while torch is still being imported (a second or two) ends like any other interrupt of
the command line: one line on stderr and exit code 130, no traceback. This module imports
nothing until :func:`main` runs; ``python -m bayesprune`` cannot do the same, since Python
imports the package (and torch) before any of its code runs."""

import sys

EXIT_INTERRUPTED = 130  # the same code as bayesprune.experiments.cli.EXIT_INTERRUPTED (tested)


def main() -> int:
    try:
        from bayesprune.experiments.cli import main as cli_main
    except KeyboardInterrupt:
        print("\ninterrupted while starting; nothing was run", file=sys.stderr)
        return EXIT_INTERRUPTED
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
