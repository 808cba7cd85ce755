"""The KV cache: one preallocated buffer per layer and one `update` method.

Every decoder uses this same object; modes differ only in which contiguous range of buffer
positions they forward (and so overwrite) at each step:

- AR: the next token's position.
- Fast-dLLM prefix cache: [block_start, end) every step; the prefix rows are reused.
- Fast-dLLM dual cache: the current block only; the suffix rows stay stale until the next
  block start refreshes them (the approximation the paper accepts).
- D2F: the in-flight window, plus finished blocks forwarded once more so their final
  keys/values are written. Under block-causal attention those rows never change again, so
  reusing them is exact.

`update` writes rows [offset, offset + T) and returns every row written so far, i.e. keys
[0, length) where `length` is the high-water mark of written positions. Positions are
python ints, so no device synchronisation is needed.
"""
from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        shape = (batch, n_kv_heads, max_len, head_dim)  # (B, H_kv, L, D)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len
        self.length = 0  # high-water mark: rows [0, length) hold keys/values

    @classmethod
    def for_model(cls, model, batch: int, max_len: int, dtype=None, device=None) -> "KVCache":
        c = model.config
        p = next(model.parameters())
        return cls(c.num_layers, batch, c.num_kv_heads, max_len, c.head_dim,
                   dtype or p.dtype, device or p.device)

    def kv_len(self, offset: int, q_len: int) -> int:
        """How many key rows a forward of [offset, offset + q_len) will attend to."""
        return max(self.length, offset + q_len)

    def update(self, layer: int, offset: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, H_kv, T, D) at rows [offset, offset+T); return rows [0, length)."""
        end = offset + k.shape[2]
        if offset < 0 or end > self.max_len:
            raise ValueError(f"KV cache write [{offset}, {end}) outside the buffer of length {self.max_len}")
        self.k[layer][:, :, offset:end] = k
        self.v[layer][:, :, offset:end] = v
        n = max(self.length, end)
        if layer == len(self.k) - 1:
            self.length = n
        return self.k[layer][:, :, :n], self.v[layer][:, :, :n]

    def truncate(self, length: int) -> None:
        """Forget rows >= length (they will be recomputed)."""
        self.length = min(self.length, length)

    def select(self, rows: Tensor) -> None:
        """Keep only these batch rows (drop finished samples from a batch)."""
        self.k = [t[rows] for t in self.k]
        self.v = [t[rows] for t in self.v]
