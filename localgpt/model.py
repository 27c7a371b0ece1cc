"""The Transformer: one compact decoder for GPT-2 and the Llama family (Llama, Mistral, Qwen2/3, Gemma 1/2/3).

Architecture differences are switches on ModelConfig. Parameter layout: q/k/v fused into `attn.qkv_proj`, gate and
up into `mlp.gate_up_proj` (one matmul each while decoding); the loader fills them from the separate checkpoint
tensors. Shapes: B batch, T new tokens, S cached positions, h heads, g kv heads, hd head dim.
This file is the math in plain torch; faster decoding paths are swapped in after loading (localgpt/backends).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from localgpt.cache import KVCache, LayerCache
from localgpt.config import ModelConfig
from localgpt.rope import RotaryTables


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 like transformers; Gemma scales by (1 + w) in float32, Llama by w after the cast."""

    def __init__(self, dim: int, eps: float, weight_offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.weight_offset = weight_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.weight_offset and x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one kernel, same float32 math
        h = F.rms_norm(x.float(), self.weight.shape, None, self.eps)  # x * rsqrt(mean(x²) + eps), in float32
        if self.weight_offset:
            return (h * (self.weight_offset + self.weight.float())).to(x.dtype)
        return self.weight * h.to(x.dtype)


def make_norm(config: ModelConfig, dim: int) -> nn.Module:
    if config.norm_kind == "layernorm":
        return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.norm_bias)
    return RMSNorm(dim, config.norm_eps, config.norm_weight_offset)


class Linear(nn.Module):
    """y = x Wᵀ + b with W as (out, in), like nn.Linear. Backends swap in subclasses with faster decoding products
    (localgpt/backends); the loader swaps in bitsandbytes layers for quantized ones."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """transformers' rotate-half RoPE, x * cos + rotate_half(x) * sin, with rotate_half's negation folded into
    the sin table: rolling x by half a head and multiplying by (-sin, sin) is the same product in fewer ops."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * signed_sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.layer_index = layer_index
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.split_sizes = (q_size, kv_size, kv_size)
        self.qkv_proj = Linear(config.hidden_size, q_size + 2 * kv_size, bias=config.qkv_bias)
        self.o_proj = Linear(q_size, config.hidden_size, bias=config.o_bias)
        if config.qk_norm:
            # (Gemma 3 scales these by (1 + w) like its other norms; Qwen3 by w)
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps, config.norm_weight_offset)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps, config.norm_weight_offset)
        self.qk_norm = config.qk_norm
        self.scale = config.scale
        self.softcap = config.attn_softcap
        self.window = config.layer(layer_index).window

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, cache: LayerCache,
                start: int | torch.Tensor) -> torch.Tensor:
        """start: the position of x's first token, or (B,) positions, one per row, for one token per row of
        independent sequences (a batch of requests)."""
        B, T, _ = x.shape
        h, g, hd = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)  # (B, T, (h + 2g) * hd)
        q_size, kv_size, _ = self.split_sizes
        v = qkv[..., q_size + kv_size :].view(B, T, g, hd)
        if self.qk_norm:  # Qwen3: per-head RMSNorm before the rotation, separate weights for q and k
            q = self.q_norm(qkv[..., :q_size].view(B, T, h, hd))
            k = self.k_norm(qkv[..., q_size : q_size + kv_size].view(B, T, g, hd))
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        else:  # q and k rotate together: one set of ops for both
            qk = qkv[..., : q_size + kv_size].view(B, T, h + g, hd)
            if rope is not None:
                qk = apply_rope(qk, *rope)
            q, k = qk.split((h, g), dim=2)
        if isinstance(start, torch.Tensor):  # each row at its own position: a mask per row says what it sees
            keys, values, visible = cache.update_rows(start, k.transpose(1, 2), v.transpose(1, 2))
            out = self.attend_rows(q.transpose(1, 2), keys, values, visible)  # (B, h, 1, hd)
            return self.o_proj(out.transpose(1, 2).reshape(B, T, h * hd))
        # (B, T, heads, hd) → (B, heads, T, hd); keys/values (B, g, S, hd) hold positions [first_key, start + T)
        keys, values, first_key = cache.update(start, k.transpose(1, 2), v.transpose(1, 2))
        out = self.attend(q.transpose(1, 2), keys, values, start, first_key)  # (B, h, T, hd)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, h * hd))

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int,
               first_key: int | None) -> torch.Tensor:
        """first_key: the position of keys[:, :, 0], or None for a ring's window in slot order (one query)."""
        B, _, T, hd = q.shape
        S = keys.shape[2]
        group = self.num_heads // self.num_kv_heads
        if self.window is not None and T == 1 and S > self.window:
            keys, values = keys[:, :, S - self.window :], values[:, :, S - self.window :]  # decoding: a slice
        if T > 1 and self.softcap is None and first_key == start and S == T and (self.window or T) >= T:
            # A prompt from the cache's first slot with nothing in the window's way: SDPA's own causal mask skips
            # the blocks above the diagonal instead of reading a (group*T, S) mask (a 4,096-token SmolLM2 layer:
            # 146 ms against 417, the same bits). Its mask is per head, so K/V are repeated for the group.
            if group > 1:
                keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
            return F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=self.scale)
        mask = None
        if T > 1:
            query_pos = torch.arange(start, start + T, device=q.device)[:, None]
            key_pos = torch.arange(first_key, first_key + S, device=q.device)[None, :]
            mask = key_pos <= query_pos  # (T, S)
            if self.window is not None:
                mask &= key_pos > query_pos - self.window
            mask = mask.repeat(group, 1)  # (group*T, S): matches the grouped query layout below
        # Grouped-query attention without copying K/V: the `group` query heads that share a kv head become
        # extra query rows of that kv head. (B, h, T, hd) → (B, g, group*T, hd)
        q = q.reshape(B, self.num_kv_heads, group * T, hd)
        if self.softcap is None:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale)
        else:
            scores = (q @ keys.transpose(-1, -2)) * self.scale  # (B, g, group*T, S)
            scores = torch.tanh(scores / self.softcap) * self.softcap
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            out = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ values
        return out.reshape(B, self.num_heads, T, hd)


    def attend_rows(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    visible: torch.Tensor) -> torch.Tensor:
        """One query per row, q (B, h, 1, hd), over keys/values (B, g, S, hd) where visible (B, S) marks the slots
        each row attends to."""
        B, h, _, hd = q.shape
        q = q.reshape(B, self.num_kv_heads, h // self.num_kv_heads, hd)  # (B, g, group, hd), as in attend
        mask = visible[:, None, None, :]  # (B, 1, 1, S): broadcast over kv heads and grouped queries
        if self.softcap is None:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale)
        else:
            scores = torch.tanh((q @ keys.transpose(-1, -2)) * self.scale / self.softcap) * self.softcap
            scores = scores.masked_fill(~mask, float("-inf"))
            out = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ values
        return out.reshape(B, h, 1, hd)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gated = config.gated_mlp
        self.act = ACTIVATIONS[config.activation]
        hidden, inner = config.hidden_size, config.intermediate_size
        if self.gated:
            self.gate_up_proj = Linear(hidden, 2 * inner, bias=config.mlp_bias)
        else:
            self.up_proj = Linear(hidden, inner, bias=config.mlp_bias)
        self.down_proj = Linear(inner, hidden, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(self.act(gate) * up)
        return self.down_proj(self.act(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.input_norm = make_norm(config, config.hidden_size)
        self.attn = Attention(config, layer_index)
        self.mlp_norm = make_norm(config, config.hidden_size)
        self.mlp = MLP(config)
        self.sandwich = config.sandwich_norm
        self.rope = config.layer(layer_index).rope if config.rope is not None else None  # its table's name
        if self.sandwich:
            self.post_attn_norm = make_norm(config, config.hidden_size)
            self.post_mlp_norm = make_norm(config, config.hidden_size)

    def forward(self, x, rope, cache: LayerCache, start: int) -> torch.Tensor:
        attn_out = self.attn(self.input_norm(x), rope, cache, start)
        if self.sandwich:
            attn_out = self.post_attn_norm(attn_out)
        x = x + attn_out
        mlp_out = self.mlp(self.mlp_norm(x))
        if self.sandwich:
            mlp_out = self.post_mlp_norm(mlp_out)
        return x + mlp_out


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.learned_positions:
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = make_norm(config, config.hidden_size)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        # The rotary tables the layers use, by name ("global", and "local" for models with a second base).
        self.rotary = {name: RotaryTables(config.rope_for(name), config.head_dim, config.max_position_embeddings)
                       for name in sorted({layer.rope for layer in self.layers if layer.rope})}
        # A length at which the whole sequence is run again, read by every generation step (longrope: past its
        # original length the tables change for every position, and transformers' Phi-3 drops its cache there).
        switches = [t.rope.original_max_position_embeddings for t in self.rotary.values()
                    if t.rope.rope_type == "longrope"]
        self.recompute_at: int | None = min(switches) if switches else None
        self.compiled_step = None  # torch.compile of `run` for one-token steps (localgpt.compiled)
        self.backend = None  # what localgpt.backends.install put in place, if anything

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight  # one parameter, not a copy

    def weight_bytes(self) -> int:
        """Bytes of the weights as stored (a tied head counted once, 4-bit packed bytes as they are): what one
        decoded token reads. An embedding that is not also the head is left out: a token reads one row of it."""
        embedding = self.embed_tokens.weight
        untied = getattr(self.lm_head, "weight", None) is not embedding
        return sum(p.numel() * p.element_size() for p in self.parameters() if not (untied and p is embedding))

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def make_cache(self, batch_size: int, max_len: int) -> KVCache:
        """A cache for batch_size sequences of up to max_len positions, one LayerCache per layer (a ring for a
        sliding layer whose window is shorter)."""
        c = self.config
        return KVCache([LayerCache(batch_size, c.num_kv_heads, max_len, c.head_dim, self.dtype, self.device,
                                   c.layer(i).window) for i in range(c.num_layers)])

    def forward(self, input_ids: torch.Tensor, cache: KVCache, start: int | None = None,
                last_only: bool = True, positions: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) at positions [cache.length, +T) → logits (B, 1 or T, vocab); the cache advances.
        `start` below cache.length trims the cache back to it first. `positions` (B,), for one token per row of
        independent sequences: each row's own position (its cache row holds the positions before it)."""
        if positions is not None:
            ropes = {name: tables.rows(positions, self.dtype, self.device) for name, tables in self.rotary.items()}
            return self.run(input_ids, ropes, cache, positions, last_only)
        if start is not None and start != cache.length and cache.trim(start) != start:
            raise ValueError(f"the cache cannot go back to position {start} (it holds {cache.length})")
        start = cache.length
        ropes = self.rope_tables(start, input_ids.shape[1])  # eager: the tables grow by Python-side caching
        if self.compiled_step is not None and input_ids.shape[1] == 1:
            return self.compiled_step(input_ids, ropes, cache, start, last_only)
        return self.run(input_ids, ropes, cache, start, last_only)

    def rope_tables(self, start: int, length: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Every rotary table the layers use, for positions [start, start+length), by name (rope.py)."""
        return {name: tables(start, length, self.dtype, self.device) for name, tables in self.rotary.items()}

    def run(self, input_ids: torch.Tensor, ropes, cache: KVCache, start: int, last_only: bool) -> torch.Tensor:
        T = input_ids.shape[1]
        x = self.embed_tokens(input_ids)  # (B, T, hidden)
        if self.config.embed_scale:
            x = x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype)
        if self.config.learned_positions:
            if isinstance(start, torch.Tensor):
                x = x + self.embed_positions(start)[:, None]  # (B, 1, hidden): each row at its own position
            else:
                x = x + self.embed_positions(torch.arange(start, start + T, device=x.device))
        for layer, layer_cache in zip(self.layers, cache.layers, strict=True):
            x = layer(x, ropes[layer.rope] if layer.rope else None, layer_cache, start)
        if last_only:
            x = x[:, -1:]  # the head runs on the last position only: vocab x hidden is the biggest matmul
        logits = self.lm_head(self.norm(x))
        if self.config.final_softcap is not None:
            logits = torch.tanh(logits / self.config.final_softcap) * self.config.final_softcap
        return logits
