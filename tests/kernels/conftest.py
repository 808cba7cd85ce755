"""Kernel tests run the Triton kernel on a GPU when there is one, else under the CPU interpreter.

The interpreter must be switched on before the process first imports triton (triton.language's
own helpers are wrapped at import). This conftest is imported before the test modules of this
folder; when an earlier test folder already imported triton (transformers and peft do), the
kernel test modules re-run themselves in a fresh process (see `run_in_fresh_process`).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

REPO_ROOT = Path(__file__).resolve().parents[2]


def pytest_configure(config):
    config.addinivalue_line("markers", "kernel: runs the Triton kernel (on a GPU, or under the CPU interpreter)")


def run_in_fresh_process(test_file: str, timeout: int = 300) -> None:
    """Run the `kernel` tests of one file in a new pytest process with the interpreter on."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", test_file, "-q", "-x", "-m", "kernel",
                           "-p", "no:cacheprovider"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{test_file} failed in a fresh process:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    summary = proc.stdout.strip().splitlines()[-1]
    assert "passed" in summary and "skipped" not in summary, f"kernel tests did not all run: {summary}"


@pytest.fixture
def fresh_process():
    return run_in_fresh_process
