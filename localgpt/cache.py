"""Static KV cache: preallocated once, written by position, never concatenated.

Layout (layers, batch, kv_heads, max_len, head_dim). Beam search reorders batch rows; a chat keeps the prefix of
the conversation and trims what it will recompute.
"""

from __future__ import annotations

import torch


def write_positions(cache_keys: torch.Tensor, cache_values: torch.Tensor, layer: int, start: int, keys: torch.Tensor,
                    values: torch.Tensor) -> None:
    """Write keys/values (B, n_kv, T, hd) into one layer of the cache buffers at positions [start, start+T)."""
    end = start + keys.shape[2]
    cache_keys[layer, :, :, start:end] = keys
    cache_values[layer, :, :, start:end] = values


@torch.library.custom_op("localgpt::write_positions", mutates_args=("cache_keys", "cache_values"))
def write_positions_op(cache_keys: torch.Tensor, cache_values: torch.Tensor, layer: int, start: int,
                       keys: torch.Tensor, values: torch.Tensor) -> None:
    """write_positions for torch.compile, with its mutations declared so the compiled step writes in place:
    traced as a slice assignment, it copied the whole cache back after every layer."""
    write_positions(cache_keys, cache_values, layer, start, keys, values)


class KVCache:
    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        # Only positions below `length` are ever read, so the buffers need no zeroing.
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.keys.shape[3]

    def update(self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor):
        """Write (B, n_kv, T, hd) keys/values at positions [start, start+T) and return views of [0, start+T)."""
        end = start + keys.shape[2]
        self.check_room(end)
        write = write_positions_op if torch.compiler.is_compiling() else write_positions
        write(self.keys, self.values, layer, start, keys, values)
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]  # (B, n_kv, end, hd)

    def check_room(self, end: int) -> None:
        """Positions up to `end` are about to be written: refuse before writing past the buffers."""
        if end > self.max_len:
            raise IndexError(f"KV cache holds {self.max_len} positions, asked to write up to {end}")

    def reorder(self, batch_indices: torch.Tensor) -> None:
        """Beam search: row i of the cache becomes old row batch_indices[i] (only the filled prefix is moved)."""
        moved = (batch_indices != torch.arange(len(batch_indices), device=batch_indices.device)).nonzero()[:, 0]
        if len(moved) == 0:
            return  # every beam continues itself: nothing to copy
        filled, sources = slice(0, self.length), batch_indices[moved]
        # The right-hand side gathers (copies) first, so rows that swap places are safe.
        self.keys[:, moved, :, filled] = self.keys[:, sources, :, filled]
        self.values[:, moved, :, filled] = self.values[:, sources, :, filled]

    def trim(self, length: int) -> None:
        """Forget positions from `length` on (they will be written again)."""
        self.length = min(self.length, length)

    def grow(self, max_len: int) -> None:
        """Reallocate to hold at least max_len positions, keeping the filled prefix."""
        if max_len <= self.max_len:
            return
        layers, batch, heads, _, head_dim = self.keys.shape
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = torch.empty((layers, batch, heads, max_len, head_dim), dtype=old.dtype, device=old.device)
            new[:, :, :, : self.length] = old[:, :, :, : self.length]
            setattr(self, name, new)
