"""The KV cache: one static buffer pair per layer, preallocated, written by position, never concatenated.

`Transformer.make_cache(batch, length)` makes it from the model's per-layer specs. Each LayerCache holds keys and
values as (batch, kv_heads, slots, head_dim) and knows how many positions it holds. A sliding-window layer whose
window is shorter than the cache asked for is a ring of `window` slots (position p in slot p % window), so a
32k-token cache of a model with a 4k window allocates 4k for its sliding layers. Beam search reorders rows; a chat
keeps the prefix of its conversation and trims what it will recompute.
"""

from __future__ import annotations

import torch

from localgpt import native


def write_positions(cache_keys: torch.Tensor, cache_values: torch.Tensor, slot: int, keys: torch.Tensor,
                    values: torch.Tensor) -> None:
    """Write keys/values (B, g, T, hd) into one layer's buffers at slots [slot, slot+T)."""
    end = slot + keys.shape[2]
    cache_keys[:, :, slot:end] = keys
    cache_values[:, :, slot:end] = values


@torch.library.custom_op("localgpt::write_positions", mutates_args=("cache_keys", "cache_values"))
def write_positions_op(cache_keys: torch.Tensor, cache_values: torch.Tensor, slot: int, keys: torch.Tensor,
                       values: torch.Tensor) -> None:
    """write_positions for torch.compile, with its mutations declared so the compiled step writes in place:
    traced as a slice assignment, it copied the whole cache back after every layer."""
    write_positions(cache_keys, cache_values, slot, keys, values)


class LayerCache:
    def __init__(self, batch_size: int, num_kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", window: int | None = None):
        self.window = window
        self.ring = window is not None and window < max_len
        slots = window if self.ring else max_len
        # Zeroed: rows of a batch at different positions attend over slots only other rows have written, masked
        # out; but a masked slot's garbage could be NaN, and 0 x NaN would still reach the weighted sum.
        self.keys = torch.zeros(batch_size, num_kv_heads, slots, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.length = 0

    @property
    def slots(self) -> int:
        return self.keys.shape[2]

    def check_room(self, end: int) -> None:
        """Positions up to `end` are about to be written: refuse before writing past the buffers (a ring never
        runs out)."""
        if not self.ring and end > self.slots:
            raise IndexError(f"KV cache holds {self.slots} positions, asked to write up to {end}")

    def update(self, start: int, keys: torch.Tensor, values: torch.Tensor):
        """Write keys/values (B, g, T, hd) for positions [start, start+T); return what attention reads:
        (keys, values, first) with keys/values (B, g, S, hd) holding positions [first, start+T) in order, or, for
        one new position in a ring, its whole window in slot order with first None (every slot is in the window,
        so no mask is needed and order does not matter to attention)."""
        T = keys.shape[2]
        end = start + T
        write = write_positions_op if torch.compiler.is_compiling() else write_positions
        if not self.ring:
            self.check_room(end)
            write(self.keys, self.values, start, keys, values)
            self.length = end
            return self.keys[:, :, :end], self.values[:, :, :end], 0
        slots = self.slots
        if T == 1:
            write(self.keys, self.values, start % slots, keys, values)
            self.length = end
            return self.keys[:, :, : min(end, slots)], self.values[:, :, : min(end, slots)], None
        # A prompt chunk: the earlier positions the ring still holds, in order, then the new ones; the chunk's
        # last `slots` positions are written (an earlier one could only be seen from inside this chunk).
        kept = min(start, slots)
        older = torch.arange(start - kept, start, device=keys.device) % slots
        all_keys = torch.cat([self.keys[:, :, older], keys], dim=2)  # (B, g, kept + T, hd)
        all_values = torch.cat([self.values[:, :, older], values], dim=2)
        written = min(T, slots)
        targets = torch.arange(end - written, end, device=keys.device) % slots
        self.keys[:, :, targets] = keys[:, :, T - written :]
        self.values[:, :, targets] = values[:, :, T - written :]
        self.length = end
        return all_keys, all_values, start - kept

    def update_rows(self, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
        """One new position per row, each row's own: write keys/values (B, g, 1, hd) at positions (B,); return
        (keys, values, visible) with keys/values (B, g, S, hd) and visible (B, S) the slots each row attends to
        (its positions so far, within its window)."""
        rows = torch.arange(keys.shape[0], device=keys.device)
        end = int(positions.max()) + 1
        self.check_room(end)
        slots = positions % self.slots if self.ring else positions
        self.keys[rows, :, slots] = keys[:, :, 0]
        self.values[rows, :, slots] = values[:, :, 0]
        count = self.slots if self.ring else end
        index = torch.arange(count, device=keys.device)[None, :]
        visible = index <= positions[:, None]  # a ring's slots are all in the window once written
        if self.window and not self.ring:
            visible &= index > positions[:, None] - self.window
        self.length = max(self.length, min(end, self.slots) if self.ring else end)
        return self.keys[:, :, :count], self.values[:, :, :count], visible

    def rows(self, index: slice) -> LayerCache:
        """A view of some rows: what is written through it is written here."""
        view = LayerCache.__new__(LayerCache)
        view.__dict__.update(self.__dict__)
        view.keys, view.values = self.keys[index], self.values[index]
        return view

    def decode_slots(self, start: int) -> tuple[int, int, int]:
        """For kernels that write one new position themselves: (slot to write, first slot to read, slots to read)
        for position `start`, counted as written."""
        end = start + 1
        if self.ring:
            slot, first, count = start % self.slots, 0, min(end, self.slots)
        else:
            self.check_room(end)
            first = max(0, end - self.window) if self.window else 0  # a window reads its last `window` positions
            slot, count = start, end - first
        self.length = end
        return slot, first, count

    def decode_rows(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """decode_slots for rows at their own positions (B,): int64 tensors (slot to write, first slot to read,
        slots to read), one per row."""
        positions = positions.to(torch.int64).contiguous()
        end = int(positions.max()) + 1
        if self.ring:
            slots, firsts, counts = positions % self.slots, torch.zeros_like(positions), (positions + 1).clamp(
                max=self.slots)
        else:
            self.check_room(end)
            firsts = (positions + 1 - self.window).clamp(min=0) if self.window else torch.zeros_like(positions)
            slots, counts = positions, positions + 1 - firsts
        self.length = max(self.length, min(end, self.slots) if self.ring else end)
        return slots.contiguous(), firsts.contiguous(), counts.contiguous()

    def filled(self) -> slice:
        return slice(0, min(self.length, self.slots))

    def reordered_span(self, shared: int) -> slice:
        """The slots a reorder copies: the filled ones from `shared` on, or all of a ring that has wrapped."""
        filled = self.filled()
        first = 0 if self.ring and self.length > self.slots else min(shared, filled.stop)
        return slice(first, filled.stop)

    def reorder(self, moved: torch.Tensor, sources: torch.Tensor, shared: int = 0) -> None:
        """Rows `moved` become copies of rows `sources`. Positions before `shared` already hold the same keys and
        values in every row, so they stay; a ring that has wrapped keeps no positions in order and moves whole."""
        span = self.reordered_span(shared)
        # The right-hand side gathers (copies) first, so rows that swap places are safe.
        self.keys[moved, :, span] = self.keys[sources, :, span]
        self.values[moved, :, span] = self.values[sources, :, span]

    def trim(self, length: int) -> None:
        """Forget positions from `length` on. A ring that has wrapped no longer holds the positions before its
        window, so going back at all forgets everything (they are recomputed)."""
        if length < self.length and self.ring and self.length > self.slots:
            self.length = 0
        self.length = min(self.length, length)

    def grow(self, max_len: int) -> None:
        """Room for max_len positions, keeping what is held; past its window a sliding layer becomes a ring."""
        if self.ring or max_len <= self.slots:
            return
        batch, heads, _, head_dim = self.keys.shape
        grown = LayerCache(batch, heads, max_len, head_dim, self.keys.dtype, self.keys.device, self.window)
        kept = min(self.length, grown.slots)
        positions = torch.arange(self.length - kept, self.length, device=self.keys.device)
        targets = positions % grown.slots if grown.ring else positions
        grown.keys[:, :, targets] = self.keys[:, :, positions]
        grown.values[:, :, targets] = self.values[:, :, positions]
        self.keys, self.values, self.ring = grown.keys, grown.values, grown.ring

    def repeat_rows(self, batch_size: int) -> LayerCache:
        """A new cache of batch_size rows, each a copy of row 0 of this one (beam search from one prefill)."""
        repeated = self.rows(slice(0, 1))
        repeated.keys, repeated.values = self.keys[:1].repeat(batch_size, 1, 1, 1), \
            self.values[:1].repeat(batch_size, 1, 1, 1)
        return repeated


class KVCache:
    """The layers' caches of one batch of sequences, which all hold the same number of positions."""

    def __init__(self, layers: list[LayerCache]):
        self.layers = layers

    @property
    def length(self) -> int:
        return self.layers[0].length

    @property
    def max_len(self) -> int:
        """Positions it can hold before it must grow (rings never limit it)."""
        linear = [layer.slots for layer in self.layers if not layer.ring]
        return min(linear) if linear else 2**62

    def reorder(self, batch_indices: torch.Tensor, shared: int = 0) -> None:
        """Beam search: row i of the cache becomes old row batch_indices[i]. Only filled slots are moved, and of
        those only positions from `shared` on: the caller says that every row holds the same keys and values
        before it (beam search's prompt, copied into every row from one prefill). Most of a beam step's copying
        was the prompt's: SmolLM2 with 4 beams, a 128-token prompt and 64 new tokens spent 2.5-3.1 ms a step here,
        now 0.7-1.0."""
        moved = (batch_indices != torch.arange(len(batch_indices), device=batch_indices.device)).nonzero()[:, 0]
        if len(moved) == 0:
            return  # every beam continues itself: nothing to copy
        sources = batch_indices[moved]
        if native.copy_rows(self.layers, moved, sources, shared):  # one call for every layer, where it runs
            return
        for layer in self.layers:
            layer.reorder(moved, sources, shared)

    def trim(self, length: int) -> int:
        """Forget positions from `length` on; returns how many are kept (fewer when a ring layer had to forget its
        window: then every layer goes back as far)."""
        for layer in self.layers:
            layer.trim(length)
        kept = min(layer.length for layer in self.layers)
        for layer in self.layers:
            layer.length = kept
        return kept

    def grow(self, max_len: int) -> None:
        for layer in self.layers:
            layer.grow(max_len)

    def rows(self, index: slice, length: int | None = None) -> KVCache:
        """A view of some rows (the requests of a batch): writes go to this cache's buffers. `length`: the
        positions the view holds (rows of a batch hold different numbers; the view's own count)."""
        view = KVCache([layer.rows(index) for layer in self.layers])
        for layer in view.layers if length is not None else ():
            layer.length = length
        return view

    def swap_rows(self, first: int, second: int, length: int) -> None:
        """Exchange two rows' first `length` positions (a ring layer's whole window)."""
        for layer in self.layers:
            held = slice(0, min(length, layer.slots))
            for buffer in (layer.keys, layer.values):
                kept = buffer[first, :, held].clone()
                buffer[first, :, held] = buffer[second, :, held]
                buffer[second, :, held] = kept

    def repeat_rows(self, batch_size: int) -> KVCache:
        return KVCache([layer.repeat_rows(batch_size) for layer in self.layers])
