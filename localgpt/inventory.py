"""What is on disk: the models in LOCALGPT_HOME and the Hugging Face cache, their description, their removal."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from localgpt.errors import ModelError
from localgpt.hub import DEFAULT_LOCAL_NAME, DEFAULT_REPO
from localgpt.paths import models_dir


@dataclass
class ModelEntry:
    name: str
    path: str
    architecture: str
    parameters: int
    dtype: str
    quantization: str | None
    size_bytes: int
    where: str  # "localgpt" or "hf-cache"
    details: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("details")
        return data


def folder_size(path: Path) -> int:
    """Bytes on disk, counting each real file once (the HF cache links snapshots to blobs)."""
    seen, total = set(), 0
    for item in path.rglob("*"):
        if item.is_file():
            real = item.resolve()
            if real not in seen:
                seen.add(real)
                total += real.stat().st_size
    return total


def describe(path: Path, name: str | None = None, where: str = "folder") -> ModelEntry:
    """Everything `show` prints, from the config and the safetensors headers (no weights are read)."""
    from localgpt.checkpoint import checkpoint_files, quantized_weight_key, read_safetensors_header
    from localgpt.config import read_json

    raw = read_json(path / "config.json", "model config")
    parameters, dtypes = 0, Counter()
    for file in checkpoint_files(path):
        entries = read_safetensors_header(file)
        stats = {quantized_weight_key(key) for key in entries} - {None}
        four_bit = {weight for weight, stat in stats if stat.startswith("quant_state")}
        for key, entry in entries.items():
            if quantized_weight_key(key):
                continue  # quantization statistics are not parameters
            count = 1
            for dim in entry.shape:
                count *= dim
            if key in four_bit:
                count *= 2  # two 4-bit values per stored byte
            parameters += count
            dtypes[entry.dtype] += count
    quantization = raw.get("quantization_config") or None
    quant_label = None
    if isinstance(quantization, dict):
        if quantization.get("load_in_4bit"):
            quant_label = f"4-bit {quantization.get('bnb_4bit_quant_type', '')}".strip()
        elif quantization.get("load_in_8bit"):
            quant_label = "8-bit"
        else:
            quant_label = str(quantization.get("quant_method", "quantized"))
    files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}
    details = {
        "layers": raw.get("num_hidden_layers", raw.get("n_layer")),
        "heads": raw.get("num_attention_heads", raw.get("n_head")),
        "kv_heads": raw.get("num_key_value_heads", raw.get("num_attention_heads", raw.get("n_head"))),
        "hidden_size": raw.get("hidden_size", raw.get("n_embd")),
        "context_length": raw.get("max_position_embeddings", raw.get("n_positions")),
        "vocab_size": raw.get("vocab_size"),
        "chat_template": (path / "chat_template.jinja").exists() or _has_config_template(path),
        "files": files,
    }
    return ModelEntry(
        name=name or path.name,
        path=str(path),
        architecture=str(raw.get("model_type", "?")),
        parameters=parameters,
        dtype=dtypes.most_common(1)[0][0] if dtypes else "?",
        quantization=quant_label,
        size_bytes=folder_size(path),
        where=where,
        details=details,
    )


def _has_config_template(path: Path) -> bool:
    try:
        return bool(json.loads((path / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError):
        return False


def list_models() -> list[ModelEntry]:
    """Runnable models in LOCALGPT_HOME/models and in the Hugging Face cache; broken ones are skipped."""
    entries: list[ModelEntry] = []
    if models_dir().is_dir():
        for folder in sorted(models_dir().iterdir()):
            if folder.name.startswith(".") or not (folder / "config.json").exists():
                continue
            try:
                entries.append(describe(folder, folder.name, "localgpt"))
            except ModelError:
                continue
    for repo_id, snapshot in hf_cache_models():
        try:
            entries.append(describe(snapshot, repo_id, "hf-cache"))
        except ModelError:
            continue
    return entries


def hf_cache_models() -> list[tuple[str, Path]]:
    """(repo id, newest snapshot folder) for model repos in the HF cache with a config and safetensors."""
    try:
        from huggingface_hub import scan_cache_dir

        info = scan_cache_dir()
    except Exception:  # no cache yet, or an unreadable one: nothing to list
        return []
    found = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        newest = max(repo.revisions, key=lambda r: r.last_modified)
        snapshot = Path(newest.snapshot_path)
        if (snapshot / "config.json").exists() and any(snapshot.glob("*.safetensors")):
            found.append((repo.repo_id, snapshot))
    return found


def find(reference: str) -> tuple[ModelEntry, Path]:
    """A cached model by the name `list` shows (or the default's repo id): (entry, folder to delete)."""
    if reference == DEFAULT_REPO and (models_dir() / DEFAULT_LOCAL_NAME / "config.json").exists():
        reference = DEFAULT_LOCAL_NAME
    local = models_dir() / reference
    if "/" not in reference and (local / "config.json").exists():
        return describe(local, reference, "localgpt"), local
    for repo_id, snapshot in hf_cache_models():
        if repo_id == reference:
            repo_folder = snapshot.parent.parent  # models--org--name/snapshots/<sha>
            return describe(snapshot, repo_id, "hf-cache"), repo_folder
    raise ModelError(f"no cached model '{reference}' — 'localgpt list' shows what is cached")


def remove(reference: str) -> ModelEntry:
    """Delete a cached model. Only folders inside LOCALGPT_HOME/models or the HF cache can be removed."""
    from huggingface_hub import constants

    entry, folder = find(reference)
    roots = [models_dir().resolve(), Path(constants.HF_HUB_CACHE).resolve()]
    resolved = folder.resolve()
    if not any(resolved != root and resolved.is_relative_to(root) for root in roots):
        raise ModelError(f"refusing to delete {folder}: it is outside localgpt's and Hugging Face's caches")
    shutil.rmtree(resolved)
    return entry
