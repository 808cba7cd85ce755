"""Decoding with the triton backend (Triton CPU interpreter, or a GPU) commits the same tokens as
with SDPA, through the engine's public API (infer.api.generate). Re-runs itself in a fresh process
when triton was imported before the interpreter could be switched on (see conftest.py)."""
import pytest

pytest.importorskip("triton")

from d2f_kernels.backends import set_backend  # noqa: E402
from kernel_helpers import DEVICE, fresh_process_fallback, needs_kernel  # noqa: E402

test_whole_file_in_fresh_process = fresh_process_fallback(__file__)


DECODES = {  # mode: (model preset, DecodeConfig kwargs)
    "d2f": ("tiny-llada", dict(max_new_tokens=16, block_size=8, tau_add=0.3, tau_act=0.5, tau_conf=0.6)),
    "fast-dllm": ("tiny-llada", dict(cache="dual", max_new_tokens=16, block_size=8, threshold=0.5)),
    "ar": ("tiny-ar", dict(max_new_tokens=8)),
}


@needs_kernel
@pytest.mark.parametrize("mode", list(DECODES))
def test_decoding_triton_equals_sdpa(mode, kernel_calls, peaked):
    """(c) infer.api.generate commits the same tokens with either backend: D2F (block-causal with
    an exact cache), Fast-dLLM dual cache (full attention, window mid-buffer) and AR (causal)."""
    api = pytest.importorskip("infer.api")
    preset, kwargs = DECODES[mode]
    model = peaked(preset, DEVICE, seed=2, num_heads=2, num_kv_heads=2)
    prompts = [[5, 9, 14, 3, 22, 7, 30], [11, 4, 8]]  # different lengths: left padding
    cfg = api.DecodeConfig(mode=mode, **kwargs)
    runs = {}
    for backend in ("sdpa", "triton"):
        set_backend(model, backend)
        runs[backend] = [(r.token_ids, r.nfe) for r in api.generate(model, None, prompts, cfg)]
    assert runs["triton"] == runs["sdpa"]
    for toks, nfe in runs["sdpa"]:  # a real decode: several forwards, varied tokens
        assert nfe > 1 and len(set(toks)) > 2
    if mode == "d2f":  # one forward per step for the batch, one layer: one kernel call each
        assert kernel_calls == ["block_causal"] * max(nfe for _, nfe in runs["triton"])
    assert kernel_calls, "the triton backend never ran the kernel"
