"""`python -m localgpt` and the `localgpt` script. Ctrl-C while Python is still importing the CLI gets the same
one-line answer as Ctrl-C anywhere else, not a traceback (see localgpt/interrupts.py for why it is deferred)."""

import sys


def run() -> None:
    from localgpt import interrupts

    interrupts.install()
    interrupts.marker("starting")
    try:
        from localgpt.cli import main
    except KeyboardInterrupt:
        sys.stderr.write("\nError: interrupted\n")
        sys.exit(130)
    main()


if __name__ == "__main__":
    run()
