import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is much faster than fighting over the shared cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def student():
    """The testbed D2F student and its tokenizer (`infer.api.load(None, "d2f")`), once per module."""
    from infer.api import load
    return load(None, "d2f")
