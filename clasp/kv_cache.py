"""A static, position-indexed KV cache with slots.

Storage is allocated once: per layer, keys and values of [slots, kv_heads, positions, head_dim].
Each request decodes in one slot; a forward pass writes keys and values at their positions of
their slot, and `lengths[slot]` is that slot's valid prefix. Rolling back after a rejected draft
is just `truncate`: the stale entries past the length are never read and are overwritten later.
A single-request cache is a cache of one slot (`length` is slot 0's).
"""

from __future__ import annotations

import torch


class SlotView:
    """One slot seen as a one-slot cache: keys/values [1, kv_heads, capacity, head_dim] views per
    layer (what the fused CPU draft reads and writes)."""

    __slots__ = ("keys", "values", "max_length")

    def __init__(self, cache: "KVCache", slot: int) -> None:
        self.keys = [k[slot:slot + 1] for k in cache.keys]
        self.values = [v[slot:slot + 1] for v in cache.values]
        self.max_length = cache.max_length


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_length: int,
        dtype: torch.dtype,
        device: torch.device,
        num_slots: int = 1,
    ) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        shape = (num_slots, num_kv_heads, max_length, head_dim)  # [slots, kv_heads, positions, head_dim]
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_length = max_length
        self.lengths = [0] * num_slots  # valid positions per slot
        self._views: dict[int, SlotView] = {}

    @property
    def num_slots(self) -> int:
        return len(self.lengths)

    @property
    def length(self) -> int:
        """Slot 0's valid length (a single-request cache)."""
        return self.lengths[0]

    @length.setter
    def length(self, value: int) -> None:
        self.lengths[0] = value

    def write(self, layer: int, slot: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v ([kv_heads, T, head_dim]) at positions start..start+T of `slot`; return that
        slot's keys/values for positions 0..start+T ([kv_heads, start+T, head_dim])."""
        end = start + k.shape[1]
        if end > self.max_length:
            raise ValueError(f"KV cache overflow: position {end} > capacity {self.max_length}")
        keys, values = self.keys[layer][slot], self.values[layer][slot]
        keys[:, start:end] = k
        values[:, start:end] = v
        return keys[:, :end], values[:, :end]

    def truncate(self, length: int, slot: int = 0) -> None:
        """Roll `slot` back to its first `length` positions."""
        if not 0 <= length <= self.max_length:
            raise ValueError(f"cannot truncate to {length} (capacity {self.max_length})")
        self.lengths[slot] = length

    def slot_view(self, slot: int) -> SlotView:
        view = self._views.get(slot)
        if view is None:
            view = self._views[slot] = SlotView(self, slot)
        return view

    def clone(self) -> "KVCache":
        other = object.__new__(KVCache)
        other.keys = [k.clone() for k in self.keys]
        other.values = [v.clone() for v in self.values]
        other.max_length = self.max_length
        other.lengths = list(self.lengths)
        other._views = {}
        return other

    def share(self) -> "KVCache":
        """A new cache over the same storage, with its own lengths (all 0): how a pool of storage at
        fixed addresses hands it out again (clasp.static_step.CachePool)."""
        other = object.__new__(KVCache)
        other.keys, other.values = self.keys, self.values
        other.max_length = self.max_length
        other.lengths = [0] * self.num_slots
        other._views = {}
        return other

    def slot_nbytes(self) -> int:
        """Bytes one slot holds (all layers, keys and values)."""
        return self.nbytes() // self.num_slots

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
