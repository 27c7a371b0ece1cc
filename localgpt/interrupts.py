"""Ctrl-C that lands where it is safe: one `Error: interrupted` line and exit 130, never an abort.

Python's own SIGINT handler raises KeyboardInterrupt in whatever Python code runs next. While a native extension
is being imported (torch, numpy, pydantic's core) or a model read, that code can be a callback that the extension
made into Python: the exception then crosses C++ frames that cannot carry it and the process aborts ("terminate
called after throwing an instance of 'pybind11::error_already_set'", exit -6), a half-initialised module fails
the next import ("cannot load module more than once per process"), or a library's `try: import … except:`
swallows it and the Ctrl-C is lost (all three seen here). So, once `install()` has run, a Ctrl-C that arrives
during any import or inside a `deferred()` block is only recorded, and raised when the import or block ends, or
at a `checkpoint()` that the block's own code passes (between tensors while loading): the user waits a moment at
most. Elsewhere (decoding, downloading) it raises at once, as Python's handler does.
"""

from __future__ import annotations

import builtins
import os
import signal
import sys
import threading

_depth = 0  # open deferred blocks and imports (signal handlers run in the main thread only)
_pending = False  # a Ctrl-C arrived inside one
_plain_import = builtins.__import__


def _on_sigint(signum, frame) -> None:
    global _pending
    if _depth:
        _pending = True
    else:
        raise KeyboardInterrupt


def checkpoint() -> None:
    """Raise the Ctrl-C that arrived inside a deferred block, here, in our own code."""
    global _pending
    if _pending:
        _pending = False
        raise KeyboardInterrupt


class deferred:  # noqa: N801 - used as `with deferred():`, like contextlib's helpers; a class, since every import enters it
    """A Ctrl-C inside the block waits for the block's end (or a checkpoint in it)."""

    def __enter__(self) -> None:
        global _depth
        _depth += 1

    def __exit__(self, kind, error, traceback) -> None:
        global _depth
        _depth -= 1
        if not _depth and kind is None:
            checkpoint()


def _deferring_import(*args, **kwargs):
    with deferred():
        return _plain_import(*args, **kwargs)


def install() -> None:
    """Replace Python's SIGINT handler with the deferring one, and defer Ctrl-C during imports (the CLI's
    entry point calls this first; a library user keeps Python's own behaviour)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_sigint)
        builtins.__import__ = _deferring_import


def marker(moment: str) -> None:
    """Under LOCALGPT_TEST_MARKERS=1, say on stderr that a moment is reached, so that a test can press Ctrl-C
    right then instead of guessing with a sleep."""
    if os.environ.get("LOCALGPT_TEST_MARKERS") == "1":
        print(f"localgpt-test-marker: {moment}", file=sys.stderr, flush=True)
