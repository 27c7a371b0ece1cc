"""Rotary position tables: default, linear, dynamic (NTK), llama3 and yarn, as transformers defines them.

Pure functions of the config: inverse frequencies → cos/sin tables. The model applies them in the
"rotate half" layout transformers uses (not the interleaved one of the original Llama code).
"""

from __future__ import annotations

import math

import torch

from localgpt.config import RopeConfig


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def inverse_frequencies(
    rope: RopeConfig, head_dim: int, max_positions: int, seq_len: int | None = None
) -> tuple[torch.Tensor, float]:
    """(inv_freq of shape (head_dim/2,), attention scaling applied to cos and sin).

    seq_len matters only for "dynamic", whose base grows once the sequence passes max_positions.
    """
    dim = head_dim
    if rope.rope_type == "default":
        return _base_inv_freq(rope.theta, dim), 1.0
    if rope.rope_type == "linear":
        return _base_inv_freq(rope.theta, dim) / rope.factor, 1.0
    if rope.rope_type == "dynamic":
        seq_len = max(seq_len or max_positions, max_positions)
        base = rope.theta * ((rope.factor * seq_len / max_positions) - (rope.factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim), 1.0
    if rope.rope_type == "llama3":
        return _llama3(rope, dim), 1.0
    if rope.rope_type == "yarn":
        return _yarn(rope, dim)
    if rope.rope_type == "longrope":
        return _longrope(rope, dim, seq_len)
    raise ValueError(f"unknown rope type {rope.rope_type!r}")


def _llama3(rope: RopeConfig, dim: int) -> torch.Tensor:
    inv_freq = _base_inv_freq(rope.theta, dim)
    old_context = rope.original_max_position_embeddings
    low_freq_wavelen = old_context / rope.low_freq_factor
    high_freq_wavelen = old_context / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are interpolated by `factor`, short ones kept, the band between smoothly blended.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    factor = rope.factor
    original = rope.original_max_position_embeddings

    def mscale(scale: float, weight: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * weight * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = float(mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim))
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a division by zero in the ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp

    pos_freqs = rope.theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolated = 1.0 / pos_freqs
    interpolated = 1.0 / (factor * pos_freqs)
    inv_freq = interpolated * (1 - extrapolation_weight) + extrapolated * extrapolation_weight
    return inv_freq, attention_factor


def _longrope(rope: RopeConfig, dim: int, seq_len: int | None) -> tuple[torch.Tensor, float]:
    """Phi-3's LongRoPE: the base frequencies divided by per-frequency factors, the long ones once the sequence
    passes the original training length; cos and sin scaled by sqrt(1 + ln(factor) / ln(original length))."""
    original = rope.original_max_position_embeddings
    factors = rope.long_factor if seq_len and seq_len > original else rope.short_factor
    scaling = rope.attention_factor
    if scaling is None:
        scaling = 1.0 if rope.factor <= 1.0 else math.sqrt(1 + math.log(rope.factor) / math.log(original))
    return _base_inv_freq(rope.theta, dim) / torch.tensor(factors, dtype=torch.float32), scaling


def cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tables for the given positions: cos, sin of shape (T, head_dim), float32."""
    freqs = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]  # (T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd)
    return emb.cos() * scaling, emb.sin() * scaling


class RotaryTables:
    """One rotary table of a model: cos and signed sin (see model.apply_rope) for positions, in the model's dtype,
    shaped (T, 1, hd) to broadcast over heads. Built on demand and grown by doubling; the pair is replaced as one
    tuple, so a reader never sees a cos of one size with a sin of another. Past a length, dynamic NTK's base and
    longrope's factors depend on the sequence length (RopeConfig.switches_past): there the tables are computed for
    each call instead, for the length that call reaches (as transformers does)."""

    def __init__(self, rope: RopeConfig, head_dim: int, max_positions: int):
        self.rope, self.head_dim, self.max_positions = rope, head_dim, max_positions
        self.tables: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, start: int, length: int, dtype: torch.dtype,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + length
        switch = self.rope.switches_past(self.max_positions)
        if switch is not None and end > switch:  # tables for this length only
            inv_freq, scaling = inverse_frequencies(self.rope, self.head_dim, self.max_positions, seq_len=end)
            return self.layout(*cos_sin(inv_freq, torch.arange(start, end, device=device), scaling), dtype)
        tables = self.tables
        if tables is None or tables[0].shape[0] < end or tables[0].dtype != dtype or tables[0].device != device:
            size = max(end, 2 * (0 if tables is None else tables[0].shape[0]), 256)
            inv_freq, scaling = inverse_frequencies(self.rope, self.head_dim, self.max_positions)
            tables = self.tables = self.layout(*cos_sin(inv_freq, torch.arange(size, device=device), scaling), dtype)
        return tables[0][start:end], tables[1][start:end]

    def rows(self, positions: torch.Tensor, dtype: torch.dtype,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for one position per row, positions (B,) → cos and signed sin (B, 1, 1, hd). Past a length
        where the tables depend on it (dynamic NTK, longrope), each row gets the table it would get alone."""
        end = int(positions.max()) + 1
        switch = self.rope.switches_past(self.max_positions)
        if switch is not None and end > switch:
            rows = [self(int(position), 1, dtype, device) for position in positions.tolist()]
            return torch.stack([cos for cos, _ in rows]), torch.stack([sin for _, sin in rows])
        cos, sin = self(0, end, dtype, device)
        return cos[positions][:, None], sin[positions][:, None]

    @staticmethod
    def layout(cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        half = sin.shape[-1] // 2
        signed_sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
        # cast like transformers (tables in float32, then to the model dtype); (T, 1, hd) broadcasts over heads
        return cos.to(dtype)[:, None], signed_sin.to(dtype)[:, None]
