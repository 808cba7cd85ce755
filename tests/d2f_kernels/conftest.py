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


def peaked_model(name: str, device, seed: int = 0, **overrides):
    """A one-layer tiny model (the interpreter is slow) with N(0, 0.4) weights and norm weights 1,
    so that logits, and so decoded tokens, are far from ties. (Random presets' default init
    gives near-uniform logits.)"""
    from d2f.models import build_model, preset_config
    from d2f.models.common import RMSNorm

    model = build_model(preset_config(name).replace(num_layers=1, **overrides), dtype=torch.float32, seed=seed)
    g = torch.Generator().manual_seed(seed)
    norms = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0) if id(p) in norms else p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    return model.to(device).eval()


@pytest.fixture
def peaked():
    return peaked_model


@pytest.fixture
def kernel_calls(monkeypatch):
    """The `kind` of every kernel call the triton backend makes (proves it did not fall back)."""
    from d2f_kernels import backends, block_attention

    calls = []

    def counting(*args, **kwargs):
        calls.append(kwargs["kind"])
        return block_attention.block_causal_attention(*args, **kwargs)

    monkeypatch.setattr(backends, "block_causal_attention", counting)
    return calls
