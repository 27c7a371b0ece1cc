"""Will it fit: the memory a model needs at a dtype or quantization and a context, against what this machine has.

No torch: `download`, `-m ORG/NAME` and `show` answer before anything heavy is imported or fetched. The estimate
is the weights as they will be held (float32 4 bytes a parameter, bfloat16 2, 8-bit about 1, 4-bit about 0.56 with
its block statistics, and the layers bitsandbytes keeps in float), the KV cache for the context, and the process
itself (Python, torch and the tokenizer: about 300 MB, measured in docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from localgpt.errors import ModelError
from localgpt.paths import human_size

PROCESS_BYTES = 300 * 2**20
ESTIMATE_CONTEXT = 4096  # tokens of KV cache counted when the context is longer (llama.cpp's default n_ctx too)
BYTES_PER_PARAMETER = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "8-bit": 1.0 + 4 / 4096,
                       "4-bit": 0.5 + 4 / 64}  # 8-bit: a float scale per row; 4-bit: a float absmax per 64


@dataclass(frozen=True)
class Estimate:
    weights: int
    kv_cache: int
    context: int
    dtype: str  # the dtype or quantization the weights are held in

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + PROCESS_BYTES


def kv_cache_bytes(raw: dict, tokens: int, element_bytes: int) -> int:
    """Keys and values for `tokens` positions of every layer (config.json's own field names)."""
    layers = raw.get("num_hidden_layers", raw.get("n_layer")) or 0
    heads = raw.get("num_attention_heads", raw.get("n_head")) or 1
    kv_heads = raw.get("num_key_value_heads") or heads
    head_dim = raw.get("head_dim") or (raw.get("hidden_size", raw.get("n_embd")) or 0) // heads
    return 2 * layers * kv_heads * head_dim * tokens * element_bytes


def estimate(raw: dict, parameters: int, dtype: str, quantization: str | None = None) -> Estimate:
    """What a model of `parameters` needs held in `dtype` (float32, bfloat16, float16), or quantized ("8-bit",
    "4-bit"; the head and embedding stay in `dtype`), with a KV cache of its context up to ESTIMATE_CONTEXT."""
    raw = raw.get("text_config", raw) if isinstance(raw.get("text_config"), dict) else raw
    context = min(raw.get("max_position_embeddings", raw.get("n_positions")) or ESTIMATE_CONTEXT, ESTIMATE_CONTEXT)
    element = int(BYTES_PER_PARAMETER[dtype])
    if quantization:
        embedding = (raw.get("vocab_size") or 0) * (raw.get("hidden_size", raw.get("n_embd")) or 0)
        kept = embedding * (1 if raw.get("tie_word_embeddings", True) else 2)
        weights = kept * element + max(parameters - kept, 0) * BYTES_PER_PARAMETER[quantization]
    else:
        weights = parameters * element
    return Estimate(int(weights), kv_cache_bytes(raw, context, element), context, quantization or dtype)


def available_memory() -> int | None:
    """LOCALGPT_MEMORY_AVAILABLE (bytes: for a container whose /proc/meminfo speaks of the host), else
    MemAvailable from /proc/meminfo (what can be allocated without swapping), or None where unknown."""
    import os

    if (given := os.environ.get("LOCALGPT_MEMORY_AVAILABLE", "").strip()).isdigit():
        return int(given)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def describe(found: Estimate) -> str:
    return (f"about {human_size(found.total)} in {found.dtype} ({human_size(found.weights)} weights, "
            f"{human_size(found.kv_cache)} KV cache for {found.context} tokens, {human_size(PROCESS_BYTES)} for "
            "the process)")


def check(found: Estimate, what: str, force: bool, hint: str) -> None:
    """Refuse, with both figures, when the estimate exceeds the memory available now (unless forced)."""
    free = available_memory()
    if free is not None and found.total > free and not force:
        raise ModelError(f"{what} needs {describe(found)}, but this machine has {human_size(free)} of memory "
                         f"available — {hint}")
