"""Every shell command in README.md and docs/*.md runs as written, or is listed here with the reason
it cannot run in CI (a GPU, the hub, hours of CPU).

Commands are taken from the ```bash blocks (continuation lines joined, trailing comments dropped).
Each one must appear in RUN or SKIP below, so a command added to the docs is never silently untested,
and each entry must still be in the docs, so none goes stale. RUN entries run in a subprocess from the
repo root with the small limits listed (the way the docs say to try a command quickly: `--limit`,
`max_steps=`, `--n`), writing under a temporary directory; `python` is this interpreter. A group of
commands that feed each other (teacher answers -> distillation) runs in order in one test.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

GPU, HUB, HOURS = "needs a CUDA GPU", "downloads from the hub", "hours on a CPU"

# documented command -> its reason not to run here
SKIP = {
    "bash scripts/test.sh": "the test suite itself",
    "bash scripts/setup.sh": "CI runs it before the tests (scripts/test.sh sets up .venv first)",
    "python -m infer.generate --model GSAI-ML/LLaDA-8B-Instruct --adapter SJTU-Deng-Lab/D2F_LLaDA_Instruct_8B_Lora "
    "--mode d2f --block-size 64 --tau-add 0.7 --tau-act 0.95 --tau-conf 0.9 --max-new-tokens 512 --device cuda "
    "--dtype bfloat16 --input-file prompts.jsonl --batch-size 8 --trace trace.jsonl --cuda-graphs": f"{HUB}; {GPU}",
    "python -m infer.lm_eval_adapter --model d2f --model_args model=GSAI-ML/LLaDA-8B-Instruct,mode=d2f "
    "--tasks gsm8k": f"{HUB}; lm-eval is an optional extra (tests/infer/test_lm_eval_adapter.py runs the adapter)",
    "python -m infer.lm_eval_adapter --model d2f --model_args model=GSAI-ML/LLaDA-8B-Instruct,mode=d2f,"
    "adapter=SJTU-Deng-Lab/D2F_LLaDA_Instruct_8B_Lora,max_new_tokens=512,block_size=64,tau_add=0.7,dtype=bfloat16 "
    "--tasks gsm8k --num_fewshot 4 --batch_size 1 --device cuda:0 --output_path outputs/lm_eval": f"{HUB}; {GPU}",
    "python -m infer.compare --config configs/compare_llada.yaml --output-dir outputs/compare_llada": f"{HUB}; {GPU}",
    "python -m infer.compare --config configs/compare_dream.yaml --output-dir outputs/compare_dream limit=200":
        f"{HUB}; {GPU}",
    "python train/pretrain.py --config configs/testbed_teacher_orders.yaml":
        f"{HOURS}; needs the orders of the line before (tests/train/test_decode_orders.py trains this config's "
        "batch on such states)",
    "accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml train/distill.py --config "
    "configs/d2f_llada.yaml": f"{HUB}; {GPU}",
    "python -m infer.bench": f"{GPU} (on a CPU it is the tiny-shape line, which runs)",
    "python -m infer.bench --compile": f"{GPU}; minutes of compiling (tests/infer/test_torch_compile.py, a slow test, "
                                       "runs it at tiny shape)",
    "python scripts/distill_ablation.py": f"{HOURS} (tests/train/test_ablation.py runs it on 2 problems)",
    "bash scripts/gpu_bench.sh outputs/gpu_bench": GPU,
    "python -m infer.serve": "a server runs until stopped (tests/infer/test_serve.py serves the same app on a socket)",
    "python -m infer.serve --model GSAI-ML/LLaDA-8B-Instruct --adapter SJTU-Deng-Lab/D2F_LLaDA_Instruct_8B_Lora "
    "--mode d2f --block-size 32 --max-new-tokens 256 --device cuda --dtype bfloat16 --max-batch 32": f"{HUB}; {GPU}",
}

# documented command -> [(text to replace, replacement), ...]; "+ ..." appends. {tmp}: the test's tmp dir.
RUN = {
    "python scripts/result_accuracy.py": [("+", "--limit 3")],
    "python scripts/result_accuracy.py --model runs/testbed_teacher_results --limit 200":
        [("runs/testbed_teacher_results", "testbed/teacher"), ("--limit 200", "--limit 3")],
    "python scripts/teacher_horizon.py": [("+", "--limit 2 --output-dir {tmp}/th")],
    "python -m infer.load_test": [("+", "--concurrency 1,2 --requests 2 --max-tokens 32 --output-dir {tmp}/lt -- "
                                        "--max-new-tokens 32 --block-size 16 --threads 1")],
    "bash scripts/setup.sh && .venv/bin/python -m infer.compare --limit 20":
        [("bash scripts/setup.sh && ", ""), ("--limit 20", "--limit 1"), ("+", "--output-dir {tmp}/c")],
    ".venv/bin/python -m infer.generate --prompt \"Tom has 3 apples and buys 4 more. How many apples does he have?\"": [],
    ".venv/bin/python -m infer.eval --mode d2f --limit 20": [("--limit 20", "--limit 2"), ("+", "--output-dir {tmp}/e")],
    "python -m infer.generate --prompt \"Tom has 3 apples and buys 4 more. How many apples does he have?\"": [],
    "python -m infer.generate --mode vanilla --steps 128 --max-new-tokens 128 --prompt \"...\"": [],
    "python -m infer.generate --mode fast-dllm --cache dual --rule threshold --threshold 0.9 --prompt \"...\"": [],
    "python -m infer.generate --mode ar --prompt \"...\"": [],
    "python -m infer.eval --mode d2f --limit 50": [("--limit 50", "--limit 2"), ("+", "--output-dir {tmp}/e")],
    "python -m infer.compare": [("+", "--limit 1 --output-dir {tmp}/c")],
    "python -m infer.compare --limit 20 --output-dir outputs/compare_quick":
        [("--limit 20", "--limit 1"), ("outputs/compare_quick", "{tmp}/c")],
    "python -m infer.compare --only teacher-vanilla,student-d2f configs.student-d2f.tau_add=0.5":
        [("+", "--limit 1 --output-dir {tmp}/c")],
    "python -m infer.compare data=real100": [("+", "limit=1 --output-dir {tmp}/c")],
    "python -m infer.eval --mode fast-dllm --cache dual --rule threshold --max-new-tokens 128 --block-size 32":
        [("+", "--limit 2 --output-dir {tmp}/e")],
    "python -m infer.eval --mode vanilla --data real100 --shots 0 --max-new-tokens 128 --block-size 32 --steps 128":
        [("+", "--limit 1 --output-dir {tmp}/e")],
    "python train/pretrain.py --config configs/testbed_ar.yaml":
        [("+", "max_steps=2 data.num_problems=64 log_every=1 output_dir={tmp}/ar")],
    "python train/pretrain.py --config configs/testbed_teacher.yaml":
        [("+", "max_steps=2 data.num_problems=64 log_every=1 output_dir={tmp}/teacher")],
    "python train/pretrain.py --config configs/testbed_teacher_results.yaml":  # from a shipped dLLM in CI
        [("+", "max_steps=2 data.num_problems=64 log_every=1 output_dir={tmp}/results init_from=testbed/teacher")],
    "python train/decode_orders.py --model runs/testbed_teacher_results --n 640 --out runs/decode_orders.pt":
        [("runs/testbed_teacher_results", "testbed/teacher"), ("--n 640", "--n 2"),
         ("runs/decode_orders.pt", "{tmp}/o.pt")],
    "python -m infer.bench --shapes tiny-llada,tiny-dream":
        [("+", "--batch-sizes 1 --samples-b1 1 --backends sdpa --no-hf --output-dir {tmp}/b")],
    "python -m infer.bench --record": [("+", "--record-problems 1 --traces {tmp}/traces.json")],
}

# commands that run in this order in one test, each with its own changes
CHAINS = {
    "try-it": [
        (".venv/bin/python scripts/make_distill_data.py --model testbed/teacher --source testbed --n 64 --mode "
         "fast-dllm --max-new-tokens 128 --batch-size 64 --out data/distill/try.jsonl",
         [("--n 64", "--n 8"), ("--batch-size 64", "--batch-size 8"), ("data/distill/try.jsonl", "{tmp}/try.jsonl")]),
        (".venv/bin/python train/distill.py --config configs/d2f_tiny.yaml data.source=data/distill/try.jsonl "
         "max_steps=30 output_dir=runs/try",
         [("data/distill/try.jsonl", "{tmp}/try.jsonl"), ("max_steps=30", "max_steps=2"), ("runs/try", "{tmp}/try"),
          ("+", "eval.every=0")]),
    ],
    "student-rounds": [  # round 1, then the round on its own decoding states (recorded on first use)
        ("python train/distill.py --config configs/d2f_tiny.yaml output_dir=runs/d2f_tiny",
         [("runs/d2f_tiny", "{tmp}/d2f"),
          ("+", "data.source={tmp}/distill.jsonl data.teacher_answers=8 max_steps=2 eval.every=0")]),
        ("python train/distill.py --config configs/d2f_tiny_states.yaml",
         [("+", "model.adapter={tmp}/d2f/adapter data.student_states={tmp}/d2f/student_states.pt "
                "data.source={tmp}/distill.jsonl output_dir={tmp}/states max_steps=2")]),
    ],
}


def shell_commands(text: str) -> list[str]:
    """The commands of every ```bash block: continuation lines joined, comments dropped."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = strip_comment(line)
            if line:
                out.append(" ".join(line.split()))
    return out


def strip_comment(line: str) -> str:
    """The line without a trailing `# comment` (a # outside quotes, at the start or after a space)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].strip()
    return line.strip()


def documented() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in DOCS:
        for cmd in shell_commands(path.read_text()):
            found.setdefault(cmd, []).append(path.name)
    return found


def apply(cmd: str, changes, tmp: Path) -> str:
    for old, new in changes:
        if old == "+":
            cmd = f"{cmd} {new}"
        else:
            assert old in cmd, f"{old!r} is no longer in {cmd!r}: update tests/test_docs.py"
            cmd = cmd.replace(old, new)
    cmd = cmd.replace("{tmp}", str(tmp))
    return re.sub(r"(^|&& )(\.venv/bin/)?python ", lambda m: f"{m.group(1)}{sys.executable} ", cmd)


def run(cmd: str) -> None:
    p = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"`{cmd}` exited {p.returncode}:\n{(p.stdout + p.stderr)[-3000:]}"


def test_shell_commands_parsing():
    text = "```bash\npython a.py --x \"a # b\"   # say\n# only a comment\npython b.py \\\n    --y 1\n```\n"
    assert shell_commands(text) == ['python a.py --x "a # b"', "python b.py --y 1"]


def test_every_documented_command_is_run_or_skipped_with_a_reason():
    chained = {cmd for steps in CHAINS.values() for cmd, _ in steps}
    listed = set(RUN) | set(SKIP) | chained
    docs = documented()
    unlisted = sorted(set(docs) - listed)
    assert not unlisted, ("commands in the docs that tests/test_docs.py neither runs nor skips with a reason: "
                          + "; ".join(f"{c} ({', '.join(docs[c])})" for c in unlisted))
    stale = sorted(listed - set(docs))
    assert not stale, f"tests/test_docs.py lists commands the docs no longer show: {stale}"
    assert not (set(RUN) & set(SKIP))


@pytest.mark.parametrize("cmd", sorted(RUN))
def test_documented_command_runs(cmd, tmp_path):
    run(apply(cmd, RUN[cmd], tmp_path))


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_documented_commands_run_in_order(name, tmp_path):
    for cmd, changes in CHAINS[name]:
        run(apply(cmd, changes, tmp_path))
