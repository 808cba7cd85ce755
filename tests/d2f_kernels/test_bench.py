"""The GPU benchmark script: its CPU behaviour, and one table row computed on the CPU (kernel under
the Triton interpreter, a fake timer) so that its correctness check and FLOP/byte accounting are
tested even where no GPU is available."""
import argparse
import functools

import pytest
import torch

pytest.importorskip("triton")
# on a CPU flex attention runs eagerly, on purpose (compiling it takes longer than the tests)
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

from d2f_kernels import bench_block_attention as bench  # noqa: E402
from d2f_kernels.block_attention import kernel_available  # noqa: E402
from kernel_helpers import fresh_process_fallback, needs_kernel  # noqa: E402

HERE = kernel_available("cpu")


test_whole_file_in_fresh_process = fresh_process_fallback(__file__, HERE)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without a GPU")
def test_main_without_cuda_exits_with_a_clear_message(capsys):
    assert bench.main(["--models", "llada"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_decode_step_starts_the_window_on_a_block_boundary():
    for cache in (256, 512, 1000, 4096):
        for window in (16, 32, 64, 256):
            prompt, bs = bench.decode_step(cache, window, 32)
            assert bs == min(32, window) and (cache - prompt) % bs == 0 and cache // 2 <= prompt <= cache


@functools.partial(needs_kernel, here=HERE)
def test_bench_row_on_cpu():
    from torch.nn.attention.flex_attention import flex_attention

    args = argparse.Namespace(batch=1, dtype="fp32", block_size=8, warmup=0, reps=1)
    row = bench.bench_shape(4, 2, 16, 16, 40, args, flex_attention, device="cpu",
                            timer=lambda fn, warmup, reps: (fn(), 1.0)[1])  # every call "takes" 1 ms
    assert row["err"] < 1e-5 and row["flex_err"] < 1e-5
    P, bs = row["prompt_len"], row["block_size"]
    assert (P, bs) == (24, 8)
    # visible keys of query i: the prompt and every block up to its own
    visible = sum(P + ((i - P) // bs + 1) * bs for i in range(40, 56))  # window [40, 56) is past the prompt
    assert row["tflops"] == pytest.approx(4 * 16 * visible * 4 / 1e-3 / 1e12)
    assert row["gbps"] == pytest.approx(4 * 16 * (2 * 4 * 16 + 2 * 2 * 56) / 1e-3 / 1e9)
    table = bench.markdown([{"model": "tiny", **row}], {"matmul_tflops": 1.0, "copy_gbps": 1.0}, True)
    assert table.splitlines()[0].startswith("| model | W | cache | triton ms | sdpa ms | flex ms |")
    assert "| tiny | 16 | 40 | 1.0000 | 1.0000 | 1.0000 | 1.00 | 1.00 |" in table
