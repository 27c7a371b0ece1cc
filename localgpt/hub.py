"""Model references: what `-m/--model` accepts, resolved to a local model folder."""

from __future__ import annotations

from pathlib import Path

from localgpt.errors import ModelError


def resolve(reference: str) -> Path:
    """A folder path → that folder, checked to look like a model folder."""
    path = Path(reference).expanduser()
    if not path.exists():
        raise ModelError(f"no model folder at {reference} — check the path")
    if not path.is_dir():
        raise ModelError(f"{reference} is a file, not a model folder — point -m at the folder holding config.json")
    if not (path / "config.json").exists():
        raise ModelError(f"no config.json in {reference} — is this a model folder?")
    return path
