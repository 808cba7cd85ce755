"""Static shapes for the decode loop, so that each model forward can be one CUDA-graph replay.

    from infer.graphs import StaticForward
    fast = StaticForward(model)            # CUDA graphs on a GPU; on a CPU the same static shapes, eagerly
    generate(fast, tok, prompts, cfg)       # any mode, the same tokens as generate(model, ...)

Why: at 8B shape a forward launches about 20 kernels per layer, some 600 in all, and on the GPU
machines we measured (`python -m infer.bench`, README) launching them cost more than running them:
20-90 ms per forward against a 3.8 ms weight-read floor. A captured graph launches them all at once.

How, without touching the decoders:
- The decoders ask the model for their KV cache (`infer.batch.new_cache`) and get a
  `d2f.cache.StaticKVCache` of `length + ROOM` rows that lives as long as this wrapper (captured
  graphs hold its buffers). Every forward attends to all of its rows.
- Keys are the rows written so far, as with a plain `KVCache`: the pattern is extended to the
  whole cache with every row past the highest row written (and past the decoder's buffer) hidden
  (`key_valid`, an input of the graph like the ids and the offset).
- A forward of T rows at buffer offset o runs as a window of W rows, W the smallest bucket >= T
  that fits, with the write offset a device tensor: one graph per (batch, W, pattern), replayed at
  any offset. The extra rows are padding, computed and discarded. A window is padded only when it
  reaches past every row written so far, so its padding rows stay hidden like any unwritten row
  until a later forward writes them for real. D2F's and AR's windows grow, so they are padded;
  Fast-dLLM's dual-cache steps (the block, inside rows written at the block start) run at T = W.
- Decoders run with `compact=False` (the batch keeps its size; `infer.api.generate` sets it).

Forwards without a cache (vanilla, the D2F reference) have static shapes already and are captured
as they are. Attention is SDPA with the dense mask (the Triton and flex backends take int offsets).

`compiled(model)` is the other speed-up applied from outside: `torch.compile` of the same forward, with
dynamic shapes so that the window and cache lengths that change every step do not recompile it. It fuses
the elementwise work between the matmuls (norms, rotary embedding, activations, residuals). Alone it runs
the plain decoders; under `StaticForward` a GPU captures the compiled kernels in its graphs.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from d2f.cache import StaticKVCache
from d2f.masks import Pattern

BUCKETS = (1, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
RECOMPILE_LIMIT = 64  # compiled graphs of the one forward function, over every mode and model in a process
COMPILE_NOTE = ("torch.compile: the first forwards of each new shape compile the model (about a minute on a laptop "
                "CPU); the rest run compiled")
ROOM = 64  # cache rows past the decoder's buffer, so short windows near its end can still be padded


class StaticForward(nn.Module):
    static_shapes = True

    def __init__(self, model, graphs: bool | None = None, buckets=BUCKETS):
        super().__init__()
        backend = getattr(model.attn_backend, "name", type(model.attn_backend).__name__)
        if backend != "sdpa":
            raise ValueError(f"StaticForward needs the sdpa attention backend, the model uses {backend!r}: "
                             "d2f_kernels.set_backend(model, 'sdpa') first")
        self.model, self.config = model, model.config
        device = next(model.parameters()).device
        self.graphs = device.type == "cuda" if graphs is None else graphs
        if self.graphs and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA model, this one is on {device}")
        self.buckets = tuple(sorted(buckets))
        self.cache: StaticKVCache | None = None
        self.length = 0  # the decoder's buffer length (rows past it are hidden)
        self.written = 0  # rows [0, written) have been written this decode; the rest are hidden
        self._captured: dict[tuple, tuple] = {}  # key -> (graph, static inputs, static output)
        self._eager: dict[tuple, dict] = {}  # key -> static inputs, without graphs
        self._pool = torch.cuda.graph_pool_handle() if self.graphs else None

    # ---- the decoders' side -----------------------------------------------------------------
    def make_cache(self, batch: int, length: int) -> StaticKVCache:
        """The decoder's KV cache for a buffer of `length` rows, reused (zeroed) while its shape fits."""
        rows = length + ROOM
        c = self.cache
        if c is None or c.k[0].shape[0] != batch or c.max_len < rows:
            if c is not None:  # graphs captured on the old buffers are useless now
                self._captured.clear()
                self._eager.clear()
            dtype = next(self.model.parameters()).dtype
            # rounded up generously: a slightly longer prompt next call reuses the buffers and graphs
            self.cache = c = StaticKVCache.for_model(self.model, batch, -(-rows // 256) * 256, dtype=dtype)
        for t in c.k + c.v:
            t.zero_()
        self.length = length
        self.written = 0
        return c

    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None, mask=None, cache=None,
                offset: int = 0) -> Tensor:
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = (torch.arange(T, device=input_ids.device) + offset).expand(B, T)
        if cache is None:  # no cache: the shapes are those of the call, nothing to pad
            W, rows = T, offset + T
        else:
            if cache is not self.cache:
                raise ValueError("StaticForward runs only with the cache it made (make_cache)")
            rows = cache.max_len
            # Pad only past every row written so far: the extra rows are then hidden like any row not
            # written yet, whatever the pattern, until a later call writes them for real.
            W = self._bucket(T, rows - offset) if offset + T >= self.written else T
            self.written = max(self.written, offset + T)
        pattern = self._pattern(mask)
        n = min(self.written, self.length) if cache is not None else rows  # key rows the decoder's pattern covers
        key = (B, W, pattern.kind, pattern.block_size, cache is None, offset if cache is None else None, rows)
        if self.graphs:
            out = self._replay(key, input_ids, position_ids, pattern, cache, offset, n)
        else:  # the same static inputs, reused the same way, run eagerly
            static = self._eager.get(key)
            if static is None:
                static = self._eager[key] = self._inputs(key, pattern, input_ids.device)
            self._fill(static, input_ids, position_ids, pattern, offset, n)
            out = self._run(static, cache)
        return out[:, :T]

    # ---- internals --------------------------------------------------------------------------
    def _bucket(self, T: int, room: int) -> int:
        for b in self.buckets:
            if T <= b <= room:
                return b
        return T

    def _pattern(self, mask) -> Pattern:
        """The decoder's pattern; `_fill` lays it over the static key rows."""
        if mask is not None and not isinstance(mask, Pattern):
            raise ValueError("StaticForward takes a d2f.masks.Pattern (or None), not an explicit mask tensor")
        return mask if mask is not None else Pattern("causal" if self.config.is_causal else "full")

    def _inputs(self, key, pattern: Pattern, device) -> dict:
        B, W, rows = key[0], key[1], key[6]
        prompt = torch.zeros(B, dtype=torch.long, device=device) if pattern.kind == "block_causal" else None
        return {"ids": torch.full((B, W), self.config.mask_token_id, dtype=torch.long, device=device),
                "pos": torch.zeros(B, W, dtype=torch.long, device=device),
                "offset": torch.zeros((), dtype=torch.long, device=device), "int_offset": key[5],
                "steps": torch.arange(1, W + 1, device=device),  # padding rows' positions past the last real one
                "pattern": Pattern(pattern.kind, prompt, pattern.block_size,
                                   torch.zeros(B, rows, dtype=torch.bool, device=device))}

    def _fill(self, static: dict, ids: Tensor, pos: Tensor, pattern: Pattern, offset: int, n: int) -> None:
        """Write this forward's inputs into the static buffers, in place (a captured graph reads them there):
        a handful of small kernels and no copy from the host. Key rows [0, n) follow the decoder's pattern;
        the rest (not written yet, or past the decoder's buffer) are hidden."""
        T, W = ids.shape[1], static["ids"].shape[1]
        static["ids"][:, :T].copy_(ids)
        static["pos"][:, :T].copy_(pos)
        if W > T:  # padding rows: mask tokens, positions continuing each sample's
            static["ids"][:, T:].fill_(self.config.mask_token_id)
            torch.add(pos[:, -1:], static["steps"][:W - T], out=static["pos"][:, T:])
        static["offset"].fill_(offset)
        p = static["pattern"]
        if pattern.key_valid is not None:
            p.key_valid[:, :n].copy_(pattern.key_valid[:, :n])
        else:
            p.key_valid[:, :n].fill_(True)
        p.key_valid[:, n:].fill_(False)
        if p.prompt_len is not None:  # block_causal: an int is filled in on the device, not copied there
            if isinstance(pattern.prompt_len, Tensor):
                p.prompt_len.copy_(pattern.prompt_len.expand(p.prompt_len.shape[0]))
            else:
                p.prompt_len.fill_(pattern.prompt_len)

    def _run(self, static: dict, cache) -> Tensor:
        offset = static["offset"] if cache is not None else static["int_offset"]
        return self.model(static["ids"], position_ids=static["pos"], mask=static["pattern"], cache=cache,
                          offset=offset)

    def _replay(self, key, ids, pos, pattern, cache, offset, n: int) -> Tensor:
        entry = self._captured.get(key)
        if entry is None:
            static = self._inputs(key, pattern, ids.device)
            self._fill(static, ids, pos, pattern, offset, n)
            # Warm up on a side stream, as capture requires. It runs this very forward, so the cache
            # rows it writes are the ones the replay below writes again.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._run(static, cache)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = self._run(static, cache)
            entry = self._captured[key] = (graph, static, out)
        else:
            self._fill(entry[1], ids, pos, pattern, offset, n)
        entry[0].replay()
        return entry[2]


def compiled(model: nn.Module) -> nn.Module:
    """`torch.compile(model, dynamic=True)`: the same forward, tokens and attributes (the wrapper reads
    `config`, `attn_backend`, ... from the model), compiled on its first call and again for each new
    specialisation (the first forward at offset 0, batch 1 against larger batches, windows reaching the
    cache's end: 1-4 graphs per mode). Every model of our classes shares one forward function, and dynamo
    allows 8 graphs per function by default, past which it runs the function eagerly (a logged warning); a
    process running several modes (infer.compare, a server) needs more, hence the higher limit.

    Two settings cut what each call costs around the compiled kernels, which at testbed size is a tenth of
    a forward (docs/bench.md). `specialize_float`: the modules' floats (norm eps, rope theta) are constants,
    not graph inputs dynamo checks with a Python guard each on every call (about 80 of them). On a CPU,
    `cpp_wrapper`: the code that calls the kernels one after another is C++ instead of Python."""
    import torch._dynamo

    cpu = next(model.parameters()).device.type == "cpu"
    if cpu:
        _check_cpp_compiler()
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, RECOMPILE_LIMIT)
    cfg.specialize_float = True
    return torch.compile(model, dynamic=True, options={"cpp_wrapper": True} if cpu else None)


def _check_cpp_compiler() -> None:
    """On a CPU torch.compile writes C++ and builds it with the system's compiler; without one the first
    forward would fail deep inside the compile, so say it before anything runs."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    from infer.decode_config import DecodeConfigError
    try:
        get_cpp_compiler()
    except Exception:
        raise DecodeConfigError("compile on a CPU needs a C++ compiler (torch.compile builds its kernels with g++, "
                                "or the compiler $CXX names) and none was found; install g++ or drop --compile") from None

