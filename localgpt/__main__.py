"""`python -m localgpt` and the `localgpt` script. Ctrl-C at any moment gets the one-line answer, exit 130, also
while Python is still importing the CLI and in the instants around main()'s own handler (see localgpt/interrupts.py
for why it is deferred during imports)."""

import sys


def run() -> None:
    try:
        from localgpt import interrupts

        interrupts.install()
        interrupts.marker("starting")
        from localgpt.cli import main

        main()  # exits through sys.exit with its own code; a Ctrl-C inside it is its own to answer
    except KeyboardInterrupt:  # before main() (or in the instant before its try) took over
        sys.stderr.write("\nError: interrupted\n")
        sys.exit(130)


if __name__ == "__main__":
    run()
