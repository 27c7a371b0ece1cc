"""ModelConfig: one normalized description of a checkpoint, read from config.json (+ generation_config.json).

Every architecture difference the model needs is an explicit switch here; families.py decides the switch values
for each `model_type`, so model.py never looks at a family name.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localgpt.errors import ModelError


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters, normalized from transformers 4.x (`rope_theta`, `rope_scaling`) or 5.x
    (`rope_parameters`)."""

    theta: float = 10000.0
    rope_type: str = "default"  # default | linear | dynamic | llama3 | yarn
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True  # yarn
    short_factor: tuple[float, ...] = ()  # longrope: per-frequency divisors up to the original length
    long_factor: tuple[float, ...] = ()  # longrope: the ones past it

    def switches_past(self, max_positions: int) -> int | None:
        """The sequence length past which this rope's tables depend on the length (dynamic NTK grows its base,
        longrope takes its long factors), or None for fixed tables."""
        if self.rope_type == "dynamic":
            return max_positions
        if self.rope_type == "longrope":
            return self.original_max_position_embeddings
        return None


@dataclass(frozen=True)
class LayerSpec:
    """What one decoder layer does differently from the others of its model (families.py decides, per layer)."""

    window: int | None = None  # sliding-window attention over the last `window` positions; None: every position
    rope: str | None = "global"  # its rotary table: "global" (ModelConfig.rope), "local" (local_rope), None: none


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float
    # Architecture switches (set per family in families.py).
    norm_kind: str = "rmsnorm"  # rmsnorm | layernorm
    norm_weight_offset: float = 0.0  # Gemma stores w and scales by (1 + w)
    activation: str = "silu"  # silu | gelu | gelu_tanh | relu
    gated_mlp: bool = True  # act(gate(x)) * up(x), else act(fc(x))
    learned_positions: bool = False  # GPT-2 wpe instead of RoPE
    rope: RopeConfig | None = field(default_factory=RopeConfig)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    norm_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k
    sandwich_norm: bool = False  # Gemma 2: extra norms after attention and after the MLP
    layers: tuple[LayerSpec, ...] = ()  # one per layer when they differ (windows, rotary tables, no-rope layers)
    local_rope: RopeConfig | None = None  # the second rotary table of models whose local layers use another base
    attn_scale: float = 0.0  # 0 means 1/sqrt(head_dim)
    attn_softcap: float | None = None
    final_softcap: float | None = None
    embed_scale: bool = False  # Gemma multiplies embeddings by sqrt(hidden_size)
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    checkpoint_dtype: str | None = None  # the dtype the weights were saved in, if config.json says

    @property
    def scale(self) -> float:
        return self.attn_scale or 1.0 / math.sqrt(self.head_dim)

    @property
    def context_length(self) -> int:
        # Dynamic NTK rope exists to run past max_position_embeddings (by its factor); the others are
        # configured with max_position_embeddings already at the extended length.
        if self.rope is not None and self.rope.rope_type == "dynamic":
            return int(self.max_position_embeddings * self.rope.factor)
        return self.max_position_embeddings

    def layer(self, index: int) -> LayerSpec:
        if self.layers:
            return self.layers[index]
        return LayerSpec(rope="global" if self.rope is not None else None)

    def rope_for(self, name: str) -> RopeConfig:
        return self.local_rope if name == "local" else self.rope


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Read a JSON object file with an error that names the file."""
    try:
        data = path.read_bytes()  # decoded below: bad UTF-8 is one more way for the file not to be JSON
    except FileNotFoundError:
        raise ModelError(f"no {path.name} in {path.parent} — is this a model folder?") from None
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror}") from None
    try:
        value = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} is not valid JSON ({exc}) — the {what} is corrupt; download it again") from None
    if not isinstance(value, dict):
        raise ModelError(f"{path} is not a JSON object — the {what} is corrupt; download it again")
    return value


def token_id_list(value: Any) -> tuple[int, ...]:
    """eos_token_id may be an int, a list of ints, or missing."""
    if value is None:
        return ()
    if isinstance(value, bool):
        raise ValueError("token id must be an integer")
    if isinstance(value, int):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    raise ValueError(f"token id must be an integer or a list of integers, not {value!r}")


def load_generation_defaults(model_dir: Path) -> dict[str, Any]:
    """The generation defaults the model's authors chose (generation_config.json, the keys that are set):
    settings.resolve reads the ones a setting declares as its model_key."""
    path = model_dir / "generation_config.json"
    if not path.exists():
        return {}
    return {key: value for key, value in read_json(path, "generation config").items() if value is not None}
