"""Block-causal attention with KV reuse: a Triton forward kernel for D2F decoding.

D2F decodes several answer blocks in flight. Each forward feeds a contiguous range of buffer
indices [q_offset, q_offset + Tq) (the in-flight window, plus rows of finished blocks whose
final keys/values are being written to the cache) and attends to buffer rows
[k_offset, k_offset + S) (the cached prefix plus the window: exactly what `KVCache.update`
returns, with k_offset = 0). The pattern (`d2f.masks.allowed`, docs/design.md §2) is

    block(i) = 0 if i < prompt_len else (i - prompt_len) // block_size + 1
    query q may see key k  iff  block(k) <= block(q)           (block_causal)
                                k <= q                          (causal)
                                always                          (full)

and the kernel computes it from indices on the fly: no dense (Tq, S) mask is built or read.
Key tiles past the last key any query of the tile may see are never loaded, and neither are
whole tiles of left padding. That is where the speed comes from: in a whole-sequence forward a
query tile of block j skips blocks j+1...(about half the work); in a decode window the tiles of
earlier blocks skip the later blocks of the window, and cache rows past the window are never read.

Padding: batches are left-padded (`d2f.masks` docstring), so each sample's pads are a prefix
[0, key_start[b]) of its row, passed as one int per sample instead of a (B, L) bool mask.
Pad *queries* follow `Pattern.dense` exactly: they see the real keys the pattern allows plus
themselves. Their rows are never read, but this way every output row equals the reference, and
none is NaN.

Inputs may be fp16, bf16 or fp32; scores, softmax statistics and the output accumulator are
fp32 (online softmax, as in FlashAttention). The kernel is forward-only: training needs
gradients, so the training-time block-causal pattern runs on SDPA (dense mask) or compiled
flex attention, which have backward passes (see `d2f_kernels/backends.py`).

    out = block_causal_attention(q, k, v, kind="block_causal", prompt_len=P, block_size=32,
                                 key_start=None, q_offset=cache_len)
    ref = block_causal_attention_reference(q, k, v, masks.block_causal(P, 32), q_offset=cache_len)

On a CPU the kernel runs under the Triton interpreter, slowly: `TRITON_INTERPRET=1` must be set
before the process first imports triton (see `interpreted`).
"""
from __future__ import annotations

import math
import os
import warnings

import torch
from torch import Tensor

from d2f.masks import KINDS, Pattern

try:
    import triton
    import triton.language as tl
except ImportError:  # no triton wheel on this platform (macOS, Windows): the reference still works
    triton = None
    tl = None

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KIND_IDS = {kind: i for i, kind in enumerate(KINDS)}  # full 0, causal 1, block_causal 2: the kernel's KIND

# ---------------------------------------------------------------------------------------------
# The kernel. One program = one tile of BLOCK_M queries of one (sample, head).
# ---------------------------------------------------------------------------------------------
if triton is not None:

    # Lengths and offsets change at every decoding step. Triton would otherwise specialise on each
    # integer argument's value being 1 or a multiple of 16, and compile a new variant mid-decode.
    @triton.jit(do_not_specialize=["num_heads", "q_len", "kv_len", "q_offset", "k_offset", "block_size"])
    def _block_causal_attn_fwd(
        Q, K, V, Out, PromptLen, KeyStart,  # PromptLen, KeyStart: (B,) int32 buffer indices
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_om, stride_od,
        num_heads, q_len, kv_len, q_offset, k_offset, block_size, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        KIND: tl.constexpr, GROUP: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        start_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // num_heads).to(tl.int64)  # int64 offsets: a big batch of long caches passes 2**31
        h = pid_bh % num_heads
        h_kv = h // GROUP  # GQA: query heads [g*GROUP, (g+1)*GROUP) share kv head g

        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows of this tile
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        q_idx = q_offset + offs_m  # buffer indices of the queries
        row_ok = offs_m < q_len
        d_ok = offs_d < HEAD_DIM

        prompt_len = tl.load(PromptLen + b)
        key_start = tl.load(KeyStart + b)  # keys before this index are left padding

        q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
        if UPCAST:  # the interpreter's bf16 arithmetic is wrong: work in fp32 there
            q = q.to(tl.float32)

        # Key range [lo, hi) in buffer indices. hi: one past the last key the tile's last query
        # may see; every later tile is fully masked and skipped. lo: the first real key, or the
        # tile's first query if that is a pad (a pad query sees itself).
        q_last = q_offset + tl.minimum((start_m + 1) * BLOCK_M, q_len) - 1
        hi = k_offset + kv_len
        if KIND == 1:
            hi = tl.minimum(hi, q_last + 1)
        if KIND == 2:
            last_block = tl.where(q_last < prompt_len, 0, (q_last - prompt_len) // block_size + 1)
            hi = tl.minimum(hi, prompt_len + last_block * block_size)
        lo = tl.maximum(tl.minimum(key_start, q_offset + start_m * BLOCK_M), k_offset)
        lo = k_offset + ((lo - k_offset) // BLOCK_N) * BLOCK_N  # tile-aligned in key rows
        if KIND == 2:
            q_block = tl.where(q_idx < prompt_len, 0, (q_idx - prompt_len) // block_size + 1)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (log2 units)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running softmax denominator
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        k_base = K + b * stride_kb + h_kv * stride_kh
        v_base = V + b * stride_vb + h_kv * stride_vh
        for start_n in range(lo, hi, BLOCK_N):
            k_idx = start_n + offs_n  # buffer indices of the keys
            rows = k_idx - k_offset  # rows of the K/V tensors
            col_ok = k_idx < hi
            kt = tl.load(k_base + rows[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                         mask=col_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
            v = tl.load(v_base + rows[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
            if UPCAST:
                kt = kt.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units

            # The pattern, from indices (d2f.masks.allowed), then key padding (Pattern.dense).
            ok = col_ok[None, :] & row_ok[:, None]
            if KIND == 1:
                ok = ok & (k_idx[None, :] <= q_idx[:, None])
            if KIND == 2:
                k_block = tl.where(k_idx < prompt_len, 0, (k_idx - prompt_len) // block_size + 1)
                ok = ok & (k_block[None, :] <= q_block[:, None])
            ok = ok & ((k_idx[None, :] >= key_start) | (k_idx[None, :] == q_idx[:, None]))
            s = tl.where(ok, s, float("-inf"))

            # Online softmax. A row that has seen no visible key yet keeps max -inf; subtract 0
            # instead so that exp gives 0, not NaN.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_i - m_safe)
            p = tl.math.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # rows past q_len have l_i 0; not stored
        o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Launching it.
# ---------------------------------------------------------------------------------------------
def interpreted() -> bool:
    """Does the kernel run under the Triton CPU interpreter in this process?

    triton.jit reads TRITON_INTERPRET when it decorates a function, and triton.language's own
    helpers (tl.max, tl.sum, ...) are decorated when triton is first imported. So the variable
    must be set before the process first imports triton (transformers and peft import it too);
    setting it later does nothing.
    """
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(_block_causal_attn_fwd, InterpretedFunction) and isinstance(tl.max, InterpretedFunction)


def kernel_available(device) -> bool:
    """Can the kernel run on tensors of this device: CUDA with compiled triton, or the interpreter."""
    if triton is None:
        return False
    return interpreted() or torch.device(device).type == "cuda"


def unavailable_reason(device) -> str:
    """Why `kernel_available(device)` is False, and what to do about it."""
    if triton is None:
        return "triton is not installed (pip install triton, Linux only)"
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and not interpreted():
        return ("TRITON_INTERPRET=1 was set after triton was first imported in this process; "
                "set it before (e.g. in the shell: TRITON_INTERPRET=1 python ...)")
    return (f"the Triton kernel needs a CUDA device, or the Triton CPU interpreter (TRITON_INTERPRET=1 "
            f"set before triton is first imported); tensors are on {torch.device(device)}")


def per_sample(value, batch: int, device, name: str) -> Tensor:
    """An int or (B,) tensor of buffer indices -> (B,) int32 on `device`."""
    if isinstance(value, Tensor):
        if value.dim() == 0:
            value = value.expand(batch)
        if value.shape != (batch,):
            raise ValueError(f"{name} must be an int or a ({batch},) tensor, got shape {tuple(value.shape)}")
        return value.to(device=device, dtype=torch.int32).contiguous()
    return torch.full((batch,), int(value), dtype=torch.int32, device=device)


def _tiles(q_len: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """BLOCK_M, BLOCK_N, num_warps.

    The interpreter pays per program and per op, not per element: big tiles there (tests pass
    block_m/block_n=16 to cross tile edges). On a GPU a decode window is short, so small query
    tiles give more programs; fp32 halves the key tile to stay within shared memory
    (sm_90 compile: 49 KB for bf16 64x64 tiles, 156 KB for fp32).
    """
    if interpreted():
        return 64, 64, 1
    block_m = 16 if q_len <= 16 else 32 if q_len <= 64 else 64
    return block_m, 32 if dtype == torch.float32 else 64, 4


def block_causal_attention(q: Tensor, k: Tensor, v: Tensor, *, kind: str = "block_causal",
                           prompt_len: Tensor | int | None = None, block_size: int | None = None,
                           key_start: Tensor | int | None = None, q_offset: int = 0, k_offset: int = 0,
                           block_m: int | None = None, block_n: int | None = None,
                           out: Tensor | None = None) -> Tensor:
    """Attention of q (B, H, Tq, D) over k, v (B, Hkv, S, D) under a full/causal/block_causal pattern.

    Queries sit at buffer indices [q_offset, q_offset + Tq), keys at [k_offset, k_offset + S)
    (k_offset is 0 with a KV cache). prompt_len (int or (B,)) and block_size define the blocks
    (block_causal only). key_start (int or (B,)): keys below it are left padding (None = 0).
    Every query must lie inside the key range, so that it can at least see itself.
    block_m / block_n override the tile sizes (powers of two >= 16). out: optional (B, H, Tq, D)
    buffer to write into (tests pass a NaN-filled one to catch rows the kernel never writes).

    Where the kernel cannot run (no triton, or a CPU without the interpreter) this warns once and
    computes the same thing with `block_causal_attention_reference`.
    """
    if kind not in KIND_IDS:
        raise ValueError(f"unknown attention kind {kind!r}; expected one of {KINDS}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, H, T, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, Tq, D = q.shape
    _, Hkv, S, _ = k.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be (B={B}, Hkv, S, D={D})")
    if H % Hkv:
        raise ValueError(f"num query heads {H} is not a multiple of num kv heads {Hkv}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in KERNEL_DTYPES:
        raise ValueError(f"q, k, v must share one of fp16/bf16/fp32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v on different devices: {q.device}, {k.device}, {v.device}")
    if q_offset < k_offset or q_offset + Tq > k_offset + S:
        raise ValueError(f"queries [{q_offset}, {q_offset + Tq}) must lie inside keys [{k_offset}, {k_offset + S})")
    if kind == "block_causal" and (prompt_len is None or block_size is None or int(block_size) <= 0):
        raise ValueError(f"block_causal needs prompt_len and block_size > 0; got {prompt_len!r}, {block_size!r}")

    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out must match q: got {tuple(out.shape)} {out.dtype} on {out.device}")
    if Tq == 0:
        return out
    if not kernel_available(q.device):  # the CPU fallback: the same pattern in plain PyTorch
        _warn_once(f"Triton kernel unavailable, using the PyTorch reference: {unavailable_reason(q.device)}")
        pattern = pattern_from_args(kind, prompt_len, block_size, key_start, B, k_offset + S, q.device)
        return out.copy_(block_causal_attention_reference(q, k, v, pattern, q_offset, k_offset))
    bm, bn, num_warps = _tiles(Tq, q.dtype)
    bm, bn = block_m or bm, block_n or bn
    for name, t in (("block_m", bm), ("block_n", bn)):
        if t < 16 or t & (t - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot's minimum), got {t}")
    prompt = per_sample(prompt_len if prompt_len is not None else 0, B, q.device, "prompt_len")
    start = per_sample(key_start if key_start is not None else 0, B, q.device, "key_start")
    # fp32 inputs (and everything under the interpreter) use exact fp32 dots; fp16/bf16 on a GPU
    # feed the tensor cores natively and accumulate in fp32.
    upcast = interpreted() or q.dtype == torch.float32
    scale = (1.0 / math.sqrt(D)) * 1.4426950408889634  # softmax in base 2: fold in log2(e)
    grid = (triton.cdiv(Tq, bm), B * H)
    _block_causal_attn_fwd[grid](
        q, k, v, out, prompt, start,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, Tq, S, q_offset, k_offset, int(block_size or 1), scale,
        HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_M=bm, BLOCK_N=bn,
        KIND=KIND_IDS[kind], GROUP=H // Hkv, UPCAST=upcast,
        DOT_PRECISION="ieee" if upcast else None, num_warps=num_warps,
    )
    return out


# ---------------------------------------------------------------------------------------------
# From a d2f.masks.Pattern to the kernel's arguments, and the reference.
# ---------------------------------------------------------------------------------------------
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def pattern_from_args(kind: str, prompt_len, block_size, key_start, batch: int, length: int, device) -> Pattern:
    """The `d2f.masks.Pattern` that the kernel's arguments describe (keys [0, length))."""
    key_valid = None
    if key_start is not None:
        starts = per_sample(key_start, batch, device, "key_start")
        key_valid = torch.arange(length, device=device)[None, :] >= starts[:, None]  # (B, length)
    if kind != "block_causal":
        return Pattern(kind, key_valid=key_valid)
    return Pattern(kind, prompt_len, int(block_size), key_valid)


def key_start_from_valid(key_valid: Tensor, end: int) -> Tensor | None:
    """(B, L) bool key_valid -> (B,) index of the first valid key, if every sample is left-padded.

    Looks at columns [0, end). Returns None when some sample's padding is not a prefix (say
    right padding or holes): the caller must then use a dense mask.
    """
    if key_valid.shape[1] < end:
        raise ValueError(f"key_valid covers {key_valid.shape[1]} positions but keys reach index {end}")
    kv = key_valid[:, :end]  # (B, end)
    start = (~kv).int().cumprod(dim=1).sum(dim=1)  # length of the leading run of pads
    cols = torch.arange(end, device=kv.device)
    if not bool((kv == (cols[None, :] >= start[:, None])).all()):
        return None
    return start


def block_causal_attention_reference(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern | None,
                                     q_offset: int = 0, k_offset: int = 0) -> Tensor:
    """Plain PyTorch attention under `pattern` (None = full), via `Pattern.dense`; fp32 math.

    The slow reference the kernel is tested against and the CPU fallback of the triton
    backend. Same index conventions as `block_causal_attention`. GQA is done by viewing the
    query heads as (Hkv, group) rather than repeating keys.
    """
    B, H, Tq, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    q_idx = torch.arange(q_offset, q_offset + Tq, device=q.device)
    k_idx = torch.arange(k_offset, k_offset + S, device=q.device)
    mask = (pattern or Pattern("full")).dense(q_idx, k_idx)  # (B|1, 1, Tq, S)
    qg = q.float().reshape(B, Hkv, H // Hkv, Tq, D)  # query head h = g * group + j uses kv head g
    scores = torch.einsum("bgjtd,bgsd->bgjts", qg, k.float()) / math.sqrt(D)  # (B, Hkv, group, Tq, S)
    scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
    out = torch.einsum("bgjts,bgsd->bgjtd", scores.softmax(-1), v.float())
    return out.reshape(B, H, Tq, D).to(q.dtype)
