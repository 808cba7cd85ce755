"""The kernel compiles for NVIDIA GPUs (Triton frontend, LLVM and the bundled ptxas) without a GPU.

The interpreter tests check the kernel's arithmetic; this checks that the same source is valid
compiled Triton (constexpr branches, loop-carried types, dot shapes and shared memory), which the
interpreter does not. It runs in a subprocess: compiling needs triton imported *without*
TRITON_INTERPRET.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO_ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from d2f_kernels.block_attention import KIND_IDS, _block_causal_attn_fwd as fn

def compile_one(dtype, kind, q_len, head_dim, group, arch):
    names = fn.arg_names
    block_m = 16 if q_len <= 16 else 32 if q_len <= 64 else 64  # as d2f_kernels.block_attention._tiles
    block_n = 32 if dtype == "fp32" else 64
    const = {"HEAD_DIM": head_dim, "BLOCK_D": max(16, triton.next_power_of_2(head_dim)), "BLOCK_M": block_m,
             "BLOCK_N": block_n, "KIND": KIND_IDS[kind], "GROUP": group, "UPCAST": dtype == "fp32",
             "DOT_PRECISION": "ieee" if dtype == "fp32" else None}
    sig = {n: "constexpr" if n in const else "*" + dtype if n in ("Q", "K", "V", "Out")
           else "*i32" if n in ("PromptLen", "KeyStart") else "fp32" if n == "qk_scale" else "i32" for n in names}
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in const.items()})
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})
    assert "ptx" in k.asm and "cubin" in k.asm, sorted(k.asm)
    limit = {80: 163 * 1024, 90: 227 * 1024}[arch]
    assert k.metadata.shared <= limit, (dtype, arch, k.metadata.shared)
    print("ok", dtype, kind, q_len, head_dim, group, arch, k.metadata.shared)

for case in sys.argv[1:]:
    dtype, kind, q_len, head_dim, group, arch = case.split(":")
    compile_one(dtype, kind, int(q_len), int(head_dim), int(group), int(arch))
"""


def compile_cases(tmp_path, *cases: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # really compile, not a cache hit
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # silence triton 3.9's notice; the default anyway
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *cases], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"compile failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


def test_compiles_for_sm90_bf16_block_causal(tmp_path):
    """The decoding configuration: LLaDA-8B head shape, bf16, a 32-row window, on H100."""
    assert compile_cases(tmp_path, "bf16:block_causal:32:128:1:90").count("ok") == 1


@pytest.mark.slow
def test_compiles_for_every_kind_dtype_and_arch(tmp_path):
    cases = [f"{dtype}:{kind}:{q_len}:{d}:{group}:{arch}"
             for dtype, kind, q_len, d, group in [("bf16", "block_causal", 256, 128, 7), ("fp16", "causal", 16, 128, 1),
                                                 ("fp32", "full", 64, 128, 1), ("bf16", "full", 100, 96, 4)]
             for arch in (80, 90)]
    assert compile_cases(tmp_path, *cases).count("ok") == len(cases)
