"""A static, position-indexed KV cache.

Storage is allocated once for the whole request. A forward pass writes keys and values at
their positions; `length` is the valid prefix. Rolling back after a rejected draft is just
`truncate`: the stale entries past `length` are never read and are overwritten later.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_length: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (1, num_kv_heads, max_length, head_dim)  # [batch, kv_heads, positions, head_dim]
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_length = max_length
        self.length = 0

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v ([1, kv_heads, T, head_dim]) at positions start..start+T; return keys/values 0..start+T."""
        end = start + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache overflow: position {end} > capacity {self.max_length}")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def truncate(self, length: int) -> None:
        """Roll back to the first `length` positions."""
        if not 0 <= length <= self.max_length:
            raise ValueError(f"cannot truncate to {length} (capacity {self.max_length})")
        self.length = length

    def clone(self) -> "KVCache":
        other = object.__new__(KVCache)
        other.keys = [k.clone() for k in self.keys]
        other.values = [v.clone() for v in self.values]
        other.max_length = self.max_length
        other.length = self.length
        return other

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
