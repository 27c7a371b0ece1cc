"""Folders that appear whole or not at all: a model is written into a hidden scratch folder beside its target and
renamed into place at the end, so an interruption or a full disk never leaves a folder that looks complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from localgpt.errors import ModelError


def refuse_existing(target: Path, force: bool) -> None:
    """Checked before any long work starts, and again when the folder is moved into place."""
    if target.exists() and not force:
        raise ModelError(f"{target} already exists — pass --force to replace it, or choose another -o")


@contextlib.contextmanager
def atomic_folder(target: Path, force: bool = False) -> Iterator[Path]:
    """Yield a scratch folder; on success it replaces `target` (which may exist only with force)."""
    refuse_existing(target, force)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    except OSError as exc:
        raise ModelError(f"cannot write {target}: {exc.strerror}") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(scratch, 0o777 & ~umask)  # mkdtemp makes it private; the finished model is an ordinary folder
    try:
        try:
            yield scratch
        except OSError as exc:  # a full disk or a lost mount while writing: the scratch folder goes, not the target
            raise ModelError(f"cannot write {target}: {exc.strerror or exc} — nothing was written") from None
        for written in scratch.rglob("*"):  # safetensors writes its files 0600: ordinary files follow the umask
            if written.is_file():
                os.chmod(written, 0o666 & ~umask)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(scratch, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(scratch, target)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
