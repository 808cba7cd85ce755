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

`StaticKVCache` is the same buffer with shapes that never change: every call attends to all
`max_len` rows and the write offset may be a device tensor, so a forward can be captured once as a
CUDA graph and replayed at any offset (`infer.graphs`). The attention pattern hides the rows that
hold nothing yet.
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


    def rows(self, a: int, b: int) -> "KVCache":
        """Batch rows [a, b) as a cache of their own that shares this one's buffers (writes go through;
        the caller takes the view's `length` back)."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = [t[a:b] for t in self.k], [t[a:b] for t in self.v]
        view.max_len, view.length = self.max_len, self.length
        return view

    def widen(self, shift: int, max_len: int, new_rows: int = 0) -> None:
        """Follow `Batch.relayout` + `Batch.concat`: move every row's keys/values right by `shift`
        (rows [0, shift) become padding), grow the buffer to max_len rows, and append `new_rows`
        empty batch rows. Keys are stored after RoPE, so a row's values stay exact where it moves."""
        if shift < 0 or max_len < self.length + shift:
            raise ValueError(f"widen: shift {shift} and max_len {max_len} would lose cached rows "
                             f"(length {self.length})")
        n = self.length
        for store in (self.k, self.v):
            for i, t in enumerate(store):
                B, H, _, D = t.shape
                new = t.new_zeros(B + new_rows, H, max_len, D)  # (B', H_kv, L', D)
                new[:B, :, shift:shift + n] = t[:, :, :n]
                store[i] = new
        self.max_len = max_len
        self.length = n + shift if n else 0

class StaticKVCache(KVCache):
    """A KVCache whose `update` returns the whole buffer (B, H_kv, max_len, D) and accepts a 0-dim
    long tensor as offset. Rows not written yet hold zeros or stale values: the caller's pattern
    must hide them from every query that is read (`infer.graphs.StaticForward` does)."""

    def kv_len(self, offset, q_len: int) -> int:
        return self.max_len

    def update(self, layer: int, offset, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if isinstance(offset, Tensor):
            idx = offset + torch.arange(k.shape[2], device=k.device)  # no host sync: capturable
            self.k[layer].index_copy_(2, idx, k)
            self.v[layer].index_copy_(2, idx, v)
        else:
            super().update(layer, offset, k, v)
        return self.k[layer], self.v[layer]

    def widen(self, shift: int, max_len: int, new_rows: int = 0) -> None:
        raise RuntimeError("a StaticKVCache keeps its shapes (captured graphs hold its buffers): requests cannot "
                           "join its batch")

    def select(self, rows: Tensor) -> None:
        raise RuntimeError("a StaticKVCache keeps its batch size (captured graphs hold its buffers): decode with "
                           "compact=False")
