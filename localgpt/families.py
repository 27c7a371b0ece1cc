"""One small entry per architecture: how its config.json maps onto ModelConfig switches, and how its checkpoint
names map onto our parameters (q/k/v and gate/up are fused at load time, GPT-2's Conv1D weights transposed).

Adding a family = one entry in FAMILIES + one parity test against transformers.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localgpt.config import LayerSpec, ModelConfig, RopeConfig, read_json, token_id_list
from localgpt.errors import ModelError

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
# Every layer gets a spec (ModelConfig.layers) as the config is read: a corrupt count like 2**40 must be refused
# before that, not exhaust memory (the config fuzz test drew one and CI was killed). Real models have under 200.
MAX_LAYERS = 4096


@dataclass(frozen=True)
class Target:
    """Where a checkpoint tensor goes: a parameter of ours, at a row offset (fused tensors), maybe transposed."""

    name: str
    row_offset: int = 0
    rows: int | None = None  # rows of a fused parameter this tensor fills (None: the whole parameter)
    transpose: bool = False


class ConfigReader:
    """Typed access to a raw config.json with errors that name the field and the file."""

    def __init__(self, raw: dict[str, Any], source: str):
        self.raw, self.source = raw, source

    def _bad(self, key: str, expected: str) -> ModelError:
        return ModelError(f"{self.source}: '{key}' must be {expected}, not {self.raw.get(key)!r}")

    def int(self, key: str, default: int | None = None, *, minimum: int = 1, maximum: int | None = None) -> int:
        value = self.raw.get(key, default)
        if value is None:
            if default is None:
                raise ModelError(f"{self.source} has no '{key}' — the model config is incomplete")
            value = default
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self._bad(key, f"an integer >= {minimum}")
        if maximum is not None and value > maximum:
            raise self._bad(key, f"an integer from {minimum} to {maximum}")
        return value

    def float(self, key: str, default: float | None) -> float | None:
        value = self.raw.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise self._bad(key, "a number")
        return float(value)

    def bool(self, key: str, default: bool) -> bool:
        value = self.raw.get(key, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._bad(key, "true or false")
        return value

    def str(self, key: str, default: str) -> str:
        value = self.raw.get(key, default)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self._bad(key, "a string")
        return value


def _activation(name: str, source: str) -> str:
    names = {
        "silu": "silu",
        "swish": "silu",
        "gelu": "gelu",
        "gelu_new": "gelu_tanh",
        "gelu_fast": "gelu_tanh",
        "gelu_pytorch_tanh": "gelu_tanh",
        "relu": "relu",
    }
    if name not in names:
        raise ModelError(f"{source}: activation '{name}' is not supported (supported: {', '.join(names)})")
    return names[name]


def _rope(cfg: ConfigReader, head_dim: int, max_positions: int) -> RopeConfig:
    """Both config styles: 4.x `rope_theta` + `rope_scaling` ({type|rope_type, factor, ...}), 5.x `rope_parameters`."""
    raw = cfg.raw
    params: dict[str, Any] = {}
    for key in ("rope_scaling", "rope_parameters"):
        value = raw.get(key)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ModelError(f"{cfg.source}: '{key}' must be an object, not {value!r}")
        if "full_attention" in value and isinstance(value["full_attention"], dict):
            value = value["full_attention"]  # 5.x nests per layer type for some families
        params.update(value)
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelError(
            f"{cfg.source}: rope type '{rope_type}' is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ModelError(f"{cfg.source}: partial_rotary_factor {partial} is not supported")
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    original = raw.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
    if rope_type in ("llama3", "yarn", "longrope") and not original:
        original = max_positions
    factor = params.get("factor")
    if factor is None:
        factor = max_positions / original if rope_type in ("yarn", "longrope") else 1.0
    short, long = params.get("short_factor") or (), params.get("long_factor") or ()
    if rope_type == "longrope" and not (isinstance(short, list) and isinstance(long, list)
                                        and len(short) == len(long) == head_dim // 2):
        raise ModelError(f"{cfg.source}: longrope needs short_factor and long_factor lists of {head_dim // 2} "
                         "numbers (half the head dimension)")
    try:
        return RopeConfig(
            theta=float(theta),
            rope_type=rope_type,
            factor=float(factor),
            original_max_position_embeddings=int(original) if original else None,
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            beta_fast=float(params.get("beta_fast") or 32.0),
            beta_slow=float(params.get("beta_slow") or 1.0),
            attention_factor=None if params.get("attention_factor") is None else float(params["attention_factor"]),
            mscale=params.get("mscale"),
            mscale_all_dim=params.get("mscale_all_dim"),
            truncate=bool(params.get("truncate", True)),
            short_factor=tuple(float(v) for v in short),
            long_factor=tuple(float(v) for v in long),
        )
    except (TypeError, ValueError):
        raise ModelError(f"{cfg.source}: rope parameters are malformed: {params!r}") from None


def _common(cfg: ConfigReader, generation: dict[str, Any], *, head_dim_default: int | None) -> dict[str, Any]:
    """Fields shared by the Llama-like families (names as transformers' LlamaConfig)."""
    hidden = cfg.int("hidden_size")
    heads = cfg.int("num_attention_heads")
    kv_heads = cfg.int("num_key_value_heads", heads)
    if heads % kv_heads:
        raise ModelError(
            f"{cfg.source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
        )
    head_dim = cfg.raw.get("head_dim") or head_dim_default or hidden // heads
    cfg_head = ConfigReader({"head_dim": head_dim}, cfg.source)
    head_dim = cfg_head.int("head_dim")
    max_positions = cfg.int("max_position_embeddings", 2048)
    return dict(
        model_type=cfg.str("model_type", ""),
        vocab_size=cfg.int("vocab_size"),
        hidden_size=hidden,
        num_layers=cfg.int("num_hidden_layers", maximum=MAX_LAYERS),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=cfg.int("intermediate_size"),
        max_position_embeddings=max_positions,
        norm_eps=cfg.float("rms_norm_eps", 1e-6),
        rope=_rope(cfg, head_dim, max_positions),
        **_token_ids(cfg, generation),
    )


def _token_ids(cfg: ConfigReader, generation: dict[str, Any]) -> dict[str, Any]:
    try:
        eos = token_id_list(generation.get("eos_token_id", cfg.raw.get("eos_token_id")))
        (bos,) = token_id_list(cfg.raw.get("bos_token_id")) or (None,)
        (pad,) = token_id_list(generation.get("pad_token_id", cfg.raw.get("pad_token_id")))[:1] or (None,)
    except ValueError as exc:
        raise ModelError(f"{cfg.source}: {exc}") from None
    return dict(eos_token_ids=eos, bos_token_id=bos, pad_token_id=pad, checkpoint_dtype=cfg.raw.get("torch_dtype")
                or cfg.raw.get("dtype"))


def _layer_types(cfg: ConfigReader, num_layers: int, default: Callable[[int], bool]) -> tuple[bool, ...]:
    """5.x writes `layer_types` ("sliding_attention" / "full_attention"); older configs imply it."""
    layer_types = cfg.raw.get("layer_types")
    if isinstance(layer_types, list) and len(layer_types) == num_layers:
        return tuple(kind == "sliding_attention" for kind in layer_types)
    return tuple(default(i) for i in range(num_layers))


def _sliding_layers(cfg: ConfigReader, num_layers: int, window: int | None,
                    default: Callable[[int], bool]) -> tuple[LayerSpec, ...]:
    """Per-layer specs of a model whose sliding layers (`default`, unless config.json lists `layer_types`) attend
    over `window` positions; () when no layer slides."""
    if window is None:
        return ()
    sliding = _layer_types(cfg, num_layers, default)
    return tuple(LayerSpec(window=window if slides else None) for slides in sliding) if any(sliding) else ()


def _window(cfg: ConfigReader) -> int | None:
    value = cfg.raw.get("sliding_window")
    return None if value is None else cfg.int("sliding_window")


def llama_config(cfg: ConfigReader, generation: dict[str, Any],
                 layers: Callable[[int], tuple[LayerSpec, ...]] = lambda count: (),
                 tied: bool = False) -> ModelConfig:
    """Llama and the families that are Llama with per-layer specs (`layers`, from the layer count) or another
    tying default."""
    fields = _common(cfg, generation, head_dim_default=None)
    bias = cfg.bool("attention_bias", False)
    return ModelConfig(
        **fields,
        activation=_activation(cfg.str("hidden_act", "silu"), cfg.source),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=cfg.bool("mlp_bias", False),
        layers=layers(fields["num_layers"]),
        tie_word_embeddings=cfg.bool("tie_word_embeddings", tied),
    )


def mistral_config(cfg: ConfigReader, generation: dict[str, Any]) -> ModelConfig:
    """Mistral, and Phi-3 / 3.5 / 4-mini (whose q/k/v and gate/up come fused in the checkpoint, our own layout,
    and whose long-context variants use longrope): a sliding window on every layer when sliding_window is set."""
    return llama_config(cfg, generation, lambda count: _sliding_layers(cfg, count, _window(cfg), lambda i: True))


def qwen_config(cfg: ConfigReader, generation: dict[str, Any], *, qwen3: bool) -> ModelConfig:
    fields = _common(cfg, generation, head_dim_default=128 if qwen3 else None)
    # transformers applies Qwen's sliding window only with use_sliding_window, from layer max_window_layers on.
    window = _window(cfg) if cfg.bool("use_sliding_window", False) else None
    first_window_layer = cfg.int("max_window_layers", 28, minimum=0)
    attention_bias = cfg.bool("attention_bias", False)
    return ModelConfig(
        **fields,
        activation=_activation(cfg.str("hidden_act", "silu"), cfg.source),
        qkv_bias=attention_bias if qwen3 else True,
        o_bias=attention_bias if qwen3 else False,
        qk_norm=qwen3,
        layers=_sliding_layers(cfg, fields["num_layers"], window, lambda i: i >= first_window_layer),
        tie_word_embeddings=cfg.bool("tie_word_embeddings", False),
    )


def _local_rope(cfg: ConfigReader) -> RopeConfig:
    """Gemma 3's second rotary table, for its sliding layers: 5.x nests it in rope_parameters under
    "sliding_attention"; 4.x hub checkpoints give only its base, rope_local_base_freq."""
    nested = cfg.raw.get("rope_parameters")
    if isinstance(nested, dict) and isinstance(nested.get("sliding_attention"), dict):
        local = nested["sliding_attention"]
        if (local.get("rope_type") or "default") != "default":
            raise ModelError(f"{cfg.source}: a scaled rotary table for sliding layers is not supported")
        return RopeConfig(theta=float(local.get("rope_theta", 10000.0)))
    return RopeConfig(theta=cfg.float("rope_local_base_freq", 10000.0))


def gemma_config(cfg: ConfigReader, generation: dict[str, Any], *, version: int) -> ModelConfig:
    """Gemma 1, 2 and 3. All: (1 + w) norms, embeddings scaled by sqrt(hidden), GELU-tanh. 2 and 3: sandwich norms
    and queries scaled by query_pre_attn_scalar. 2: soft-capping and alternate sliding layers. 3: q/k norms, and
    sliding layers (all but every sliding_window_pattern-th, unless layer_types lists them) with their own rotary
    base; a gemma3 (image-text) checkpoint's text model from its text_config."""
    if version == 3 and isinstance(cfg.raw.get("text_config"), dict):
        # (model_type stays gemma3: its key map is the one that finds the text model's tensors)
        cfg = ConfigReader({**cfg.raw["text_config"], "model_type": cfg.raw["model_type"]}, cfg.source)
    fields = _common(cfg, generation, head_dim_default=256)
    activation = cfg.raw.get("hidden_activation") or cfg.str("hidden_act", "gelu_pytorch_tanh")
    if activation == "gelu":  # transformers: Gemma's legacy "gelu" means the tanh approximation
        activation = "gelu_pytorch_tanh"
    bias = cfg.bool("attention_bias", False)
    extra: dict[str, Any] = {}
    if version >= 2:
        extra = dict(sandwich_norm=True, attn_scale=cfg.float("query_pre_attn_scalar", 256) ** -0.5)
    if version == 2:
        window = _window(cfg) if "sliding_window" in cfg.raw else 4096
        extra.update(attn_softcap=cfg.float("attn_logit_softcapping", 50.0),
                     final_softcap=cfg.float("final_logit_softcapping", 30.0),
                     layers=_sliding_layers(cfg, fields["num_layers"], window, lambda i: (i + 1) % 2 == 1))
    if version == 3:
        window = _window(cfg) or 4096
        pattern = cfg.int("sliding_window_pattern", 6)
        sliding = _layer_types(cfg, fields["num_layers"], lambda i: (i + 1) % pattern != 0)
        extra.update(qk_norm=True, attn_softcap=cfg.float("attn_logit_softcapping", None),
                     final_softcap=cfg.float("final_logit_softcapping", None), local_rope=_local_rope(cfg),
                     layers=tuple(LayerSpec(window=window, rope="local") if slides else LayerSpec()
                                  for slides in sliding))
    return ModelConfig(
        **fields,
        activation=_activation(activation, cfg.source),
        norm_weight_offset=1.0,
        embed_scale=True,
        qkv_bias=bias,
        o_bias=bias,
        tie_word_embeddings=cfg.bool("tie_word_embeddings", True),
        **extra,
    )


def smollm3_config(cfg: ConfigReader, generation: dict[str, Any]) -> ModelConfig:
    """SmolLM3: Llama with no-rope layers (no_rope_layers[i] == 0: layer i attends without rotation; by default
    every no_rope_layer_interval-th), and with use_sliding_window a window on those layers."""

    def layers(count: int) -> tuple[LayerSpec, ...]:
        uses_rope = cfg.raw.get("no_rope_layers")
        if uses_rope is None:
            interval = cfg.int("no_rope_layer_interval", 4)
            uses_rope = [int((i + 1) % interval != 0) for i in range(count)]
        if not isinstance(uses_rope, list) or len(uses_rope) != count or any(v not in (0, 1) for v in uses_rope):
            raise ModelError(f"{cfg.source}: 'no_rope_layers' must list 0 or 1 for each of the {count} layers")
        window = _window(cfg) if cfg.bool("use_sliding_window", False) else None
        sliding = _layer_types(cfg, count, lambda i: window is not None and not uses_rope[i])
        return tuple(LayerSpec(window=window if slides else None, rope="global" if rope else None)
                     for slides, rope in zip(sliding, uses_rope, strict=True))

    return llama_config(cfg, generation, layers, tied=True)


def gpt2_config(cfg: ConfigReader, generation: dict[str, Any]) -> ModelConfig:
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if cfg.bool(flag, False):
            raise ModelError(f"{cfg.source}: GPT-2 option '{flag}' is not supported")
    if not cfg.bool("scale_attn_weights", True):
        raise ModelError(f"{cfg.source}: GPT-2 option 'scale_attn_weights: false' is not supported")
    hidden = cfg.int("n_embd")
    heads = cfg.int("n_head")
    return ModelConfig(
        model_type="gpt2",
        vocab_size=cfg.int("vocab_size"),
        hidden_size=hidden,
        num_layers=cfg.int("n_layer", maximum=MAX_LAYERS),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=cfg.int("n_inner", 4 * hidden),
        max_position_embeddings=cfg.int("n_positions", 1024),
        norm_eps=cfg.float("layer_norm_epsilon", 1e-5),
        norm_kind="layernorm",
        norm_bias=True,
        activation=_activation(cfg.str("activation_function", "gelu_new"), cfg.source),
        gated_mlp=False,
        learned_positions=True,
        rope=None,
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        tie_word_embeddings=cfg.bool("tie_word_embeddings", True),
        **_token_ids(cfg, generation),
    )


# --- checkpoint key maps ---------------------------------------------------------------------------------------

_LLAMA_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)\.(weight|bias)$")
# gemma3 (image-text) checkpoints keep the text model under language_model: 4.x "language_model.model.",
# 5.x "model.language_model."; the vision tower and projector are not read.
_GEMMA3_TEXT = re.compile(r"^(?:language_model\.model\.|model\.language_model\.)")


def gemma3_target(config: ModelConfig, key: str) -> Target | None:
    if key.startswith(("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                       "model.multi_modal_projector.")):
        return None
    if key in ("language_model.lm_head.weight",):
        key = "lm_head.weight"
    return llama_target(config, _GEMMA3_TEXT.sub("model.", key))
_GPT2_LAYER = re.compile(r"^(?:transformer\.)?h\.(\d+)\.(.+)\.(weight|bias)$")


def llama_target(config: ModelConfig, key: str) -> Target | None:
    q_rows = config.num_heads * config.head_dim
    kv_rows = config.num_kv_heads * config.head_dim
    top = {
        "model.embed_tokens.weight": "embed_tokens.weight",
        "model.norm.weight": "norm.weight",
        "lm_head.weight": "lm_head.weight",
    }
    bare = key if key.startswith(("model.", "lm_head")) else f"model.{key}"
    if bare in top:
        return Target(top[bare])
    match = _LLAMA_LAYER.match(key)
    if not match:
        return None
    index, module, kind = match.groups()
    prefix = f"layers.{index}."
    inner = config.intermediate_size
    fused = {
        "self_attn.q_proj": ("attn.qkv_proj", 0, q_rows),
        "self_attn.k_proj": ("attn.qkv_proj", q_rows, kv_rows),
        "self_attn.v_proj": ("attn.qkv_proj", q_rows + kv_rows, kv_rows),
        "mlp.gate_proj": ("mlp.gate_up_proj", 0, inner),
        "mlp.up_proj": ("mlp.gate_up_proj", inner, inner),
    }
    if module in fused:
        name, offset, rows = fused[module]
        return Target(f"{prefix}{name}.{kind}", row_offset=offset, rows=rows)
    plain = {
        "self_attn.qkv_proj": "attn.qkv_proj",  # Phi-3 stores them fused, as we hold them
        "mlp.gate_up_proj": "mlp.gate_up_proj",
        "self_attn.o_proj": "attn.o_proj",
        "self_attn.q_norm": "attn.q_norm",
        "self_attn.k_norm": "attn.k_norm",
        "mlp.down_proj": "mlp.down_proj",
        "input_layernorm": "input_norm",
        # Gemma 2 normalizes the attention output with post_attention_layernorm and has a separate pre-MLP norm.
        "post_attention_layernorm": "post_attn_norm" if config.sandwich_norm else "mlp_norm",
        "pre_feedforward_layernorm": "mlp_norm",
        "post_feedforward_layernorm": "post_mlp_norm",
    }
    if module in plain:
        return Target(f"{prefix}{plain[module]}.{kind}")
    return None


def gpt2_target(config: ModelConfig, key: str) -> Target | None:
    top = {
        "wte.weight": "embed_tokens.weight",
        "wpe.weight": "embed_positions.weight",
        "ln_f.weight": "norm.weight",
        "ln_f.bias": "norm.bias",
    }
    bare = key.removeprefix("transformer.")
    if bare in top:
        return Target(top[bare])
    if key == "lm_head.weight":
        return Target("lm_head.weight")
    match = _GPT2_LAYER.match(key)
    if not match:
        return None
    index, module, kind = match.groups()
    names = {
        "ln_1": "input_norm",
        "ln_2": "mlp_norm",
        "attn.c_attn": "attn.qkv_proj",
        "attn.c_proj": "attn.o_proj",
        "mlp.c_fc": "mlp.up_proj",
        "mlp.c_proj": "mlp.down_proj",
    }
    if module not in names:
        return None
    # GPT-2 stores its projections as Conv1D, (in_features, out_features): transpose to nn.Linear's layout.
    transpose = kind == "weight" and module.startswith(("attn.", "mlp."))
    return Target(f"layers.{index}.{names[module]}.{kind}", transpose=transpose)


@dataclass(frozen=True)
class Family:
    build_config: Callable[[ConfigReader, dict[str, Any]], ModelConfig]
    target: Callable[[ModelConfig, str], Target | None]


FAMILIES: dict[str, Family] = {
    "gpt2": Family(gpt2_config, gpt2_target),
    "llama": Family(llama_config, llama_target),
    "mistral": Family(mistral_config, llama_target),
    "qwen2": Family(lambda c, g: qwen_config(c, g, qwen3=False), llama_target),
    "qwen3": Family(lambda c, g: qwen_config(c, g, qwen3=True), llama_target),
    "gemma": Family(lambda c, g: gemma_config(c, g, version=1), llama_target),
    "gemma2": Family(lambda c, g: gemma_config(c, g, version=2), llama_target),
    "gemma3_text": Family(lambda c, g: gemma_config(c, g, version=3), llama_target),
    "smollm3": Family(smollm3_config, llama_target),
    "phi3": Family(mistral_config, llama_target),
    "gemma3": Family(lambda c, g: gemma_config(c, g, version=3), gemma3_target),
}


def family_for(model_type: str, source: str = "config.json") -> Family:
    if model_type not in FAMILIES:
        raise ModelError(
            f"{source}: model_type {model_type!r} is not supported (supported: {', '.join(sorted(FAMILIES))})"
        )
    return FAMILIES[model_type]


def config_from_dict(raw: dict[str, Any], generation: dict[str, Any] | None = None, source: str = "config.json"):
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ModelError(f"{source} has no 'model_type' — is this a transformers model config?")
    reader = ConfigReader(raw, source)
    config = family_for(model_type, source).build_config(reader, generation or {})
    check_shapes(config, source)
    return config


def check_shapes(config, source: str) -> None:
    """Sizes that each read fine alone but cannot build a model together (found by fuzzing config.json)."""
    if config.head_dim < 1:
        raise ModelError(f"{source}: {config.num_heads} attention heads do not fit a hidden size of "
                         f"{config.hidden_size} — the model config is corrupt")
    if config.num_heads % config.num_kv_heads:
        raise ModelError(f"{source}: {config.num_heads} attention heads cannot share {config.num_kv_heads} key/value "
                         "heads evenly — the model config is corrupt")
    if config.learned_positions and config.num_heads * config.head_dim != config.hidden_size:
        raise ModelError(f"{source}: a hidden size of {config.hidden_size} does not split into {config.num_heads} "
                         "heads — the model config is corrupt")


def load_config(model_dir: Path) -> ModelConfig:
    """config.json (+ generation_config.json's eos ids) → ModelConfig, with clear errors for bad files."""
    raw = read_json(model_dir / "config.json", "model config")
    generation_path = model_dir / "generation_config.json"
    generation = read_json(generation_path, "generation config") if generation_path.exists() else {}
    return config_from_dict(raw, generation, source=str(model_dir / "config.json"))
