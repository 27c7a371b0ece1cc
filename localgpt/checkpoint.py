"""Safetensors checkpoints as files: the shards of a model folder and each file's validated header, read without
torch (`localgpt list` and `show` use this alone; weights.py reads the tensors).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from localgpt.errors import ModelError
from localgpt.paths import PICKLE_SUFFIXES

# safetensors' dtype codes → (torch's name for the dtype, bytes per element)
SAFETENSORS_DTYPES = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit; a larger claim is corruption, not a model


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # torch's name: getattr(torch, entry.dtype) is the dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """Parse and validate a .safetensors header: every tensor's bytes must lie inside the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ModelError(f"{path} is truncated (no safetensors header) — download it again")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise ModelError(
                    f"{path} is truncated or corrupt (header claims {header_len} bytes, file has {size}) — "
                    "download it again"
                )
            header_bytes = f.read(header_len)
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror}") from None
    try:
        header = json.loads(header_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelError(f"{path} has a corrupt safetensors header — download it again") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path} has a corrupt safetensors header — download it again")
    data_start = 8 + header_len
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, itemsize = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{path}: tensor '{name}' has a malformed header entry — download it again") from None
        numel = 1
        for dim in shape:
            if dim < 0:
                raise ModelError(f"{path}: tensor '{name}' has a negative dimension — the file is corrupt")
            numel *= dim
        expected = numel * itemsize
        if begin < 0 or end - begin != expected or data_start + end > size:
            raise ModelError(
                f"{path} is truncated or corrupt: tensor '{name}' needs bytes {begin}..{end} "
                f"of a {size - data_start}-byte data section — download it again"
            )
        entries[name] = TensorEntry(name, dtype, shape, data_start + begin, expected)
    return entries


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model folder: sharded index, single file, or refuse pickles clearly."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise ModelError(f"{index} is corrupt — download the model again") from None
        files = []
        for name in names:
            shard = (model_dir / name).resolve()
            if shard.parent != model_dir.resolve():
                raise ModelError(f"{index} names a shard outside the model folder: {name!r}")
            if not shard.exists():
                raise ModelError(f"shard {name} listed in {index.name} is missing from {model_dir} — download again")
            files.append(shard)
        return files
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    others = sorted(model_dir.glob("*.safetensors"))
    if others:
        return others
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelError(
            f"{model_dir} has only pickled weights ({', '.join(pickles[:3])}); localgpt never loads pickles, "
            "which can run arbitrary code — use a safetensors version of this model"
        )
    raise ModelError(f"no .safetensors weights in {model_dir} — is this a model folder?")


def quantized_weight_key(key: str) -> tuple[str, str] | None:
    """A bitsandbytes statistic's checkpoint name → (its weight's name, the statistic): `….q_proj.weight.absmax` →
    (`….q_proj.weight`, `absmax`); `….q_proj.SCB` → (`….q_proj.weight`, `SCB`). None for any other tensor."""
    if ".weight." in key:
        module, stat = key.split(".weight.", 1)
        return f"{module}.weight", stat
    for stat in ("SCB", "weight_format"):
        if key.endswith(f".{stat}"):
            return f"{key.removesuffix(stat)}weight", stat
    return None
