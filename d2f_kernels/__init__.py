"""Attention kernels and the backends that put them in a model.

    from d2f_kernels import set_backend
    set_backend(model, "triton")    # "sdpa" (default), "flex", "triton", "reference", "auto"

`d2f_kernels.block_attention` holds the Triton block-causal kernel (D2F decoding with KV reuse) and
its PyTorch reference; `d2f_kernels.bench_block_attention` benchmarks it on a GPU.
"""
from d2f_kernels.backends import BACKENDS, get_backend, set_backend

__all__ = ["BACKENDS", "get_backend", "set_backend"]
