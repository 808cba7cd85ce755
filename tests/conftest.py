import os
import sys

import pytest
import torch

# The Triton kernel's tests run under the CPU interpreter when there is no GPU, and Triton reads
# TRITON_INTERPRET when it is first imported. transformers and peft import it early, from test folders
# that run before tests/d2f_kernels/, so the switch is set here, first; then the kernel tests run in this
# process instead of re-running in a fresh one (tests/d2f_kernels/conftest.py).
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Two cores on CI; extra intra-op threads only add contention between tests.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
