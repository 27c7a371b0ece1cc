"""Safetensors checkpoints → a Transformer, with bounded memory and clear errors.

The model is built on the `meta` device, its parameters are allocated once in the chosen dtype, and every
checkpoint tensor is read from the file straight into its place (a row slice of a fused q/k/v or gate/up
parameter). Only a tensor that needs a dtype conversion or a transpose passes through one temporary buffer, so
peak memory is the weights plus the largest single tensor. Pickled checkpoints are never opened.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from localgpt.config import ModelConfig
from localgpt.errors import ModelError
from localgpt.families import family_for
from localgpt.hub import PICKLE_SUFFIXES
from localgpt.model import Transformer

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit; a larger claim is corruption, not a model


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
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
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{path}: tensor '{name}' has a malformed header entry — download it again") from None
        numel = 1
        for dim in shape:
            if dim < 0:
                raise ModelError(f"{path}: tensor '{name}' has a negative dimension — the file is corrupt")
            numel *= dim
        expected = numel * dtype.itemsize
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


def _writable_buffer(tensor: torch.Tensor):
    """A writable memoryview over a contiguous CPU tensor's bytes (for file.readinto)."""
    nbytes = tensor.numel() * tensor.element_size()
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")


def _read_into(file, entry: TensorEntry, destination: torch.Tensor, path: Path) -> None:
    file.seek(entry.offset)
    view = _writable_buffer(destination)
    filled = 0
    while filled < entry.nbytes:
        count = file.readinto(view[filled:])
        if not count:
            raise ModelError(f"{path} ended early while reading '{entry.name}' — download it again")
        filled += count


def choose_dtype(name: str, device: torch.device) -> torch.dtype:
    """--dtype → torch dtype. auto: bfloat16 on CUDA; on CPU float32 (measured faster here, docs/benchmarks.md)."""
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return names[name]


@contextlib.contextmanager
def _skip_random_init():
    """Modules built on `meta` still run their random init, which is slow there and useless: skip it."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "ones_", "zeros_")
    saved = {name: getattr(torch.nn.init, name) for name in names}
    try:
        for name in names:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def load_weights(model_dir: Path, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> Transformer:
    family = family_for(config.model_type)
    with torch.device("meta"), _skip_random_init():
        model = Transformer(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.tie_weights()  # to_empty allocates per parameter; re-share the tied head
    model.eval().requires_grad_(False)
    params = dict(model.named_parameters(remove_duplicate=False))
    rows_filled = {name: 0 for name in params}
    for path in checkpoint_files(model_dir):
        entries = read_safetensors_header(path)
        with open(path, "rb", buffering=0) as file:
            for key, entry in entries.items():
                if config.tie_word_embeddings and key == "lm_head.weight":
                    continue  # tied: the embedding is the head
                target = family.target(config, key)
                if target is None:
                    continue  # buffers we recompute (rotary tables, GPT-2's mask) or parts we do not run
                if target.name not in params:
                    raise ModelError(f"{path.name}: tensor '{key}' does not fit this {config.model_type} config")
                param = params[target.name]
                shape = entry.shape[::-1] if target.transpose else entry.shape
                rows = param.shape[0] if target.rows is None else target.rows
                expected = (rows, *param.shape[1:])
                if tuple(shape) != expected:
                    raise ModelError(
                        f"{path.name}: tensor '{key}' has shape {list(entry.shape)}, expected "
                        f"{list(expected[::-1] if target.transpose else expected)} — the weights do not match "
                        "config.json"
                    )
                destination = param.data[target.row_offset : target.row_offset + rows]
                direct = entry.dtype == dtype and not target.transpose and device.type == "cpu"
                if direct:
                    _read_into(file, entry, destination, path)
                else:
                    staging = torch.empty(entry.shape, dtype=entry.dtype)
                    _read_into(file, entry, staging, path)
                    destination.copy_(staging.t() if target.transpose else staging)
                    del staging
                rows_filled[target.name] += rows
    missing = [
        name for name, param in params.items()
        if rows_filled[name] < param.shape[0] and not (name == "lm_head.weight" and config.tie_word_embeddings)
    ]
    if missing and missing == ["lm_head.weight"]:
        # Some checkpoints tie the head without saying so: no lm_head tensor means the embedding is the head.
        model.lm_head.weight = model.embed_tokens.weight
        missing = []
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise ModelError(f"{model_dir}: the checkpoint is missing tensors for {shown} — download it again")
    model.use_fast_layout()
    return model


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer  # noqa: F821 - imported lazily
    config: ModelConfig
    generation_defaults: dict
    path: Path


def choose_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"--device {name}: no CUDA device is available here — use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ModelError(f"--device {name!r} is not a device torch knows (try cpu or cuda)") from None


def load_model(model_dir: Path, dtype: str = "auto", device: str = "auto") -> LoadedModel:
    """A model folder → model, tokenizer and config, ready to generate."""
    from localgpt.config import load_config, load_generation_defaults
    from localgpt.tokenizer import Tokenizer

    config = load_config(model_dir)
    tokenizer = Tokenizer(model_dir, config.eos_token_ids)
    torch_device = choose_device(device)
    model = load_weights(model_dir, config, choose_dtype(dtype, torch_device), torch_device)
    return LoadedModel(model, tokenizer, config, load_generation_defaults(model_dir), model_dir)
