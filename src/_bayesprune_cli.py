"""The ``bayesprune`` console script: :func:`bayesprune.experiments.cli.main`, started so that a
Ctrl-C while torch is still being imported (a second or two) ends like any other interrupt of
the command line: one line on stderr and exit code 130, no traceback.

A SIGINT that lands inside an extension module's initialisation (numpy's, say) does not surface
as a ``KeyboardInterrupt`` but as whatever that module's half-done import raises next (numpy:
"cannot load module more than once per process"), so the interrupt is held back while the
command line is imported and acted on once the import is over. This module imports nothing
until :func:`main` runs; ``python -m bayesprune`` cannot do the same, since Python imports the
package (and torch) before any of its code runs."""

import signal
import sys

EXIT_INTERRUPTED = 130  # the same code as bayesprune.experiments.cli.EXIT_INTERRUPTED (tested)


def _import_cli():
    """The CLI's ``main`` and whether a Ctrl-C arrived while it was being imported."""
    interrupted = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
    except ValueError:  # not the main thread: signals cannot be held back there
        previous = None
    try:
        from bayesprune.experiments.cli import main as cli_main
    except KeyboardInterrupt:
        return None, True
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return cli_main, bool(interrupted)


def main() -> int:
    cli_main, interrupted = _import_cli()
    if interrupted:
        print("\ninterrupted while starting; nothing was run", file=sys.stderr)
        return EXIT_INTERRUPTED
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
