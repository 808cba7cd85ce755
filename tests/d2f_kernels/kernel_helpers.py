"""What the kernel test modules share: where the kernel can run in this process, and the two pieces
that route each `kernel` test either here or into one fresh pytest process (see conftest.py for why
a process that imported triton before the interpreter was switched on cannot run it)."""
import pytest
import torch

from d2f_kernels.block_attention import kernel_available

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HERE = kernel_available(DEVICE)  # False on a CPU when triton was imported before TRITON_INTERPRET was set


def needs_kernel(test, here: bool = HERE):
    """Marks a test that runs the kernel: here if it can, else in the module's fresh-process test."""
    skip = pytest.mark.skipif(not here, reason="kernel unavailable in this process; "
                              "test_whole_file_in_fresh_process runs it")
    return pytest.mark.kernel(skip(test))


def fresh_process_fallback(test_file: str, here: bool = HERE):
    """The test that re-runs `test_file`'s kernel tests in a fresh process when they cannot run here.
    Assign it as `test_whole_file_in_fresh_process = fresh_process_fallback(__file__)`."""
    @pytest.mark.skipif(here, reason="the kernel runs in this process: the tests below run directly")
    def test_whole_file_in_fresh_process(fresh_process):
        fresh_process(test_file)
    return test_whole_file_in_fresh_process
