"""Where localgpt keeps things, and the file kinds it refuses: small constants every module may import.

LOCALGPT_HOME (default ~/.cache/localgpt) holds converted and quantized models (models/), the native kernels built
for this machine (native/), the chat history and the log (logs.db).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from localgpt.errors import ModelError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # pickled weights: never loaded (they can run code)


def home() -> Path:
    return Path(os.environ.get("LOCALGPT_HOME") or Path.home() / ".cache" / "localgpt").expanduser()


def models_dir() -> Path:
    return home() / "models"


def writable_models_dir() -> Path:
    """models_dir(), created; checked before any long work is spent on something that must be written there."""
    folder = models_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        raise ModelError(f"cannot write {folder}: {exc.strerror or exc} — set LOCALGPT_HOME to a folder you can "
                         "write") from None
    return folder


def human_size(size: float) -> str:
    """Bytes as people read them: 538.1 MB (powers of 1000, as disks and downloads are sized)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"
