"""Attention backends (sdpa, flex, triton, reference) against the one definition, and the triton
backend inside tiny models: whole-sequence forwards and cached block-by-block forwards give the
same logits as SDPA (decoding: test_decoding.py).

The triton backend runs on a GPU when there is one, else under the Triton CPU interpreter (see
tests/d2f_kernels/conftest.py; this file re-runs itself in a fresh process when triton was imported
before the interpreter could be switched on).
"""
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("triton")
# on a CPU flex attention runs eagerly, on purpose (compiling it takes longer than the tests)
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

from d2f import masks  # noqa: E402
from d2f.cache import KVCache  # noqa: E402
from d2f.models import load_model  # noqa: E402
from d2f.models.base import AttnContext  # noqa: E402
from d2f.models.common import SDPABackend, reference_attention  # noqa: E402
from d2f_kernels import block_attention  # noqa: E402
from d2f_kernels.backends import (FlexBackend, ReferenceBackend, TritonBackend, get_backend,  # noqa: E402
                              set_backend)
from kernel_helpers import DEVICE, HERE, fresh_process_fallback, needs_kernel  # noqa: E402

test_whole_file_in_fresh_process = fresh_process_fallback(__file__)


def attend(backend, q, k, v, mask, q_offset, q_len, k_offset, kv_len, device=DEVICE):
    """One backend alone: queries at buffer indices [q_offset, +q_len), keys at [k_offset, +kv_len)."""
    return AttnContext(mask, q_offset, q_len, k_offset, kv_len, device, backend).attend(q, k, v)


def flex_runs() -> str | None:
    """None if flex attention runs here, else why not (it needs torch >= 2.5; CPU support varies)."""
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
        q = torch.randn(1, 1, 8, 16, device=DEVICE)
        with warnings.catch_warnings():  # eager flex on a CPU, on purpose (see pytestmark)
            warnings.simplefilter("ignore")
            attend(FlexBackend(), q, q, q, masks.block_causal(3, 2), 0, 8, 0, 8)
    except Exception as e:  # noqa: BLE001 - any failure means: skip, and say why
        return f"flex attention does not run here: {type(e).__name__}: {e}"
    return None


FLEX_SKIP = flex_runs()


def qkv(B, H, Hkv, Tq, S, D=16, dtype=torch.float32, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, t, D, generator=g).to(device, dtype) for h, t in ((H, Tq), (Hkv, S), (Hkv, S)))


def left_pad(starts, length):
    return torch.arange(length, device=DEVICE)[None, :] >= torch.tensor(starts, device=DEVICE)[:, None]


def random_mask(n):
    """An explicit (B, 1, n, n) bool mask no pattern describes; every query sees itself."""
    keep = torch.rand(2, 1, n, n, generator=torch.Generator().manual_seed(0)) > 0.3
    return (keep | torch.eye(n, dtype=torch.bool)).to(DEVICE)


# name: (mask factory, q_offset, q_len, k_offset, kv_len). Masks are built per call (tensors on DEVICE).
SCENARIOS = {
    "none_is_full": (lambda: None, 0, 21, 0, 21),
    "full_left_pad": (lambda: masks.full(left_pad([0, 5], 40)), 0, 21, 0, 21),
    "causal_with_cache": (lambda: masks.causal(), 17, 9, 0, 26),
    "block_causal_cache": (lambda: masks.block_causal(11, 8, left_pad([3, 0], 60)), 19, 24, 0, 43),
    "block_causal_prompt_lens": (lambda: masks.block_causal(torch.tensor([9, 12], device=DEVICE), 4), 0, 28, 0, 28),
    "block_causal_no_cache_offset": (lambda: masks.block_causal(11, 8), 19, 16, 19, 16),
    "right_padding_falls_back": (lambda: masks.block_causal(5, 4, torch.arange(30, device=DEVICE).expand(2, 30) < 27),
                                 0, 30, 0, 30),
    "explicit_tensor_mask": (lambda: random_mask(13), 0, 13, 0, 13),
}


def expected(mask, q, k, v, q_offset, k_offset):
    if isinstance(mask, torch.Tensor):
        return reference_attention(q, k, v, mask)
    pattern = mask or masks.Pattern("full")
    q_idx = torch.arange(q_offset, q_offset + q.shape[2], device=DEVICE)
    k_idx = torch.arange(k_offset, k_offset + k.shape[2], device=DEVICE)
    return reference_attention(q, k, v, pattern.dense(q_idx, k_idx))


def expected_cpu(pattern, q, k, v, q_offset):
    mask = pattern.dense(torch.arange(q_offset, q_offset + q.shape[2]), torch.arange(k.shape[2]))
    return reference_attention(q, k, v, mask)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("name", ["sdpa", "flex", pytest.param("triton", marks=pytest.mark.kernel), "reference"])
def test_backend_matches_dense_reference(name, scenario):
    if name == "flex" and FLEX_SKIP:
        pytest.skip(FLEX_SKIP)
    if name == "triton" and not HERE:
        pytest.skip("kernel unavailable in this process; test_whole_file_in_fresh_process runs it")
    make_mask, q_offset, q_len, k_offset, kv_len = SCENARIOS[scenario]
    mask = make_mask()
    q, k, v = qkv(2, 4, 2, q_len, kv_len)
    backend = get_backend(name)
    got = attend(backend, q, k, v, mask, q_offset, q_len, k_offset, kv_len)
    torch.testing.assert_close(got, expected(mask, q, k, v, q_offset, k_offset), atol=2e-5, rtol=1e-5)


@needs_kernel
def test_triton_backend_uses_the_kernel_for_patterns(kernel_calls):
    """Patterns reach the kernel; tensor masks and non-prefix padding go to SDPA."""
    calls = kernel_calls
    q, k, v = qkv(2, 4, 2, 8, 20)
    b = TritonBackend()
    with torch.no_grad():
        attend(b, q, k, v, masks.block_causal(6, 4, left_pad([2, 0], 20)), 12, 8, 0, 20)
        attend(b, q, k, v, None, 12, 8, 0, 20)
        attend(b, q, k, v, torch.ones(1, 1, 8, 20, dtype=torch.bool, device=DEVICE), 12, 8, 0, 20)
        holes = left_pad([0, 0], 20) & (torch.arange(20, device=DEVICE) != 7)
        attend(b, q, k, v, masks.full(holes), 12, 8, 0, 20)
    assert calls == ["block_causal", "full"]


@needs_kernel
def test_triton_backend_falls_back_to_sdpa_for_gradients_and_float64():
    pattern = masks.block_causal(5, 4)
    b = TritonBackend()
    q, k, v = qkv(1, 2, 2, 12, 12)
    q.requires_grad_(True)
    ctx = AttnContext(pattern, 0, 12, 0, 12, DEVICE, b)
    out = b(q, k, v, ctx)
    assert out.grad_fn is not None  # SDPA, differentiable
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    want = expected(pattern, q.detach(), k, v, 0, 0)
    torch.testing.assert_close(out.detach(), want, atol=2e-5, rtol=1e-5)
    q64, k64, v64 = (t.detach().double() for t in (q, k, v))
    got64 = b(q64, k64, v64, ctx)  # SDPA in float64; the naive reference computes in fp32
    assert got64.dtype == torch.float64
    torch.testing.assert_close(got64, expected(pattern, q64, k64, v64, 0, 0), atol=1e-6, rtol=1e-6)


def test_triton_backend_without_kernel_uses_the_reference(monkeypatch):
    """On a CPU without the interpreter the triton backend still computes the right thing."""
    monkeypatch.setattr(block_attention, "interpreted", lambda: False)
    monkeypatch.setattr(block_attention, "_warned", set())
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    pattern = masks.block_causal(6, 4, torch.arange(20)[None, :] >= torch.tensor([[2], [0]]))
    q, k, v = qkv(2, 4, 2, 8, 20, device="cpu")
    b = TritonBackend()
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="using the PyTorch reference"):
        got = attend(b, q, k, v, pattern, 12, 8, 0, 20, device="cpu")
    torch.testing.assert_close(got, expected_cpu(pattern, q, k, v, 12), atol=2e-5, rtol=1e-5)


def test_set_backend_and_get_backend():
    model = load_model("tiny-llada")
    assert isinstance(set_backend(model, "reference").attn_backend, ReferenceBackend)
    assert isinstance(set_backend(model, "auto").attn_backend, SDPABackend if DEVICE == "cpu" else TritonBackend)
    wrapper = nn.ModuleDict({"inner": model})  # like DDP wrappers: the model sits inside
    set_backend(wrapper, "flex")
    assert isinstance(model.attn_backend, FlexBackend)
    custom = SDPABackend()
    assert set_backend(model, custom).attn_backend is custom
    with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
        get_backend("fast")
    with pytest.raises(ValueError, match="Linear has no attention backend"):
        set_backend(nn.Linear(2, 2), "sdpa")


def test_set_backend_reaches_the_model_inside_peft():
    peft = pytest.importorskip("peft")
    model = load_model("tiny-llada")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    set_backend(lora, "reference")
    assert isinstance(model.attn_backend, ReferenceBackend)
    assert "attn_backend" not in vars(lora)  # the wrapper itself was not given one


# ---- inside the models ------------------------------------------------------------------------
def tokens(B, L, vocab, seed=0):
    return torch.randint(2, vocab - 2, (B, L), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


@needs_kernel
@pytest.mark.parametrize("name", ["tiny-llada", "tiny-dream"])
@torch.no_grad()
def test_model_full_sequence_block_causal_triton_equals_sdpa(name, kernel_calls, peaked):
    """(a) one forward over prompt + answer under block-causal attention, left-padded batch."""
    model = peaked(name, DEVICE)
    P, bs, L = 13, 8, 37
    x = tokens(2, L, model.config.vocab_size)
    key_valid = left_pad([0, 4], L)
    pos = (torch.arange(L, device=DEVICE)[None] - torch.tensor([0, 4], device=DEVICE)[:, None]).clamp_min(0)
    pattern = masks.block_causal(P, bs, key_valid)
    want = set_backend(model, "sdpa")(x, position_ids=pos, mask=pattern)
    got = set_backend(model, "triton")(x, position_ids=pos, mask=pattern)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert kernel_calls == ["block_causal"]  # one layer, one kernel call


@needs_kernel
@torch.no_grad()
def test_model_cached_block_by_block_triton_equals_sdpa_and_full_sequence(kernel_calls, peaked):
    """(b) prompt, then windows of two in-flight blocks against a KV cache (q_offset > 0).

    Under block-causal attention cached keys are exact, so every cached step's logits equal both
    the SDPA backend's and the whole-sequence forward's at the same positions."""
    model = peaked("tiny-llada-gqa", DEVICE)
    P, bs, nblocks = 11, 6, 4
    L = P + nblocks * bs
    x = tokens(1, L, model.config.vocab_size, seed=1)
    pattern = masks.block_causal(P, bs)
    full = set_backend(model, "sdpa")(x, mask=pattern)  # (1, L, V)
    # windows: prompt; blocks 0-1; blocks 1-2 (block 1 rewritten); blocks 2-3
    windows = [(0, P)] + [(P + i * bs, P + (i + 2) * bs) for i in range(nblocks - 1)]
    for backend in ("sdpa", "triton"):
        set_backend(model, backend)
        cache = KVCache.for_model(model, 1, L)
        for lo, hi in windows:
            logits = model(x[:, lo:hi], mask=pattern, cache=cache, offset=lo)
            torch.testing.assert_close(logits, full[:, lo:hi], atol=1e-4, rtol=1e-4,
                                       msg=lambda m: f"{backend} window [{lo}, {hi}): {m}")
    assert len(kernel_calls) == len(windows)
