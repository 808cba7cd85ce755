"""Accuracy of a testbed model on held-out GSM8K-format problems (the numbers in the model cards).

    python scripts/eval_testbed.py --model testbed/teacher --mode vanilla            # LLaDA low-confidence remasking
    python scripts/eval_testbed.py --model testbed/ar --mode ar                      # greedy, KV-cached
    python scripts/eval_testbed.py --model runs/testbed_teacher --limit 100 --out preds.jsonl

Prompts are the chat-formatted bare questions the models were trained on (d2f.data.tokenizer.prompt_ids);
decoding goes through the engine's `infer.api.generate` at temperature 0; a problem counts as solved
when `d2f.data.extract.is_correct(answer, final)`. Prints one summary line and a JSON dict.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from d2f.data.extract import extract_answer, is_correct  # noqa: E402
from d2f.errors import positive_int  # noqa: E402
from d2f.data.gsm8k import load_gsm8k  # noqa: E402
from d2f.data.tokenizer import load_tokenizer, prompt_ids  # noqa: E402
from d2f.models import from_pretrained  # noqa: E402


def evaluate(model, tokenizer, problems: list[dict], mode: str, gen: int, block: int, steps: int | None,
             batch_size: int) -> tuple[dict, list[dict]]:
    from infer.api import DecodeConfig, generate
    cfg = DecodeConfig(mode=mode, max_new_tokens=gen, block_size=block, steps=steps, temperature=0.0)
    prompts = [prompt_ids(tokenizer, p["question"]) for p in problems]
    t0 = time.time()
    results = generate(model, tokenizer, prompts, cfg, batch_size=batch_size)
    wall = time.time() - t0
    records = []
    for p, r in zip(problems, results):
        records.append({"question": p["question"], "gold": p["final"], "pred": extract_answer(r.text),
                        "correct": is_correct(r.text, p["final"]), "num_tokens": r.num_tokens, "nfe": r.nfe,
                        "text": r.text})
    n = len(records)
    summary = {"n": n, "accuracy": sum(r["correct"] for r in records) / max(n, 1),
               "avg_answer_tokens": sum(r["num_tokens"] for r in records) / max(n, 1),
               "avg_nfe": sum(r["nfe"] for r in records) / max(n, 1), "wall_s": wall,
               "decode": {"mode": mode, "gen_length": gen, "block_size": block, "steps": cfg.total_steps
                          if mode != "ar" else None, "temperature": 0.0, "batch_size": batch_size}}
    return summary, records


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="model directory (testbed/teacher, testbed/ar, runs/...) "
                    "or a training checkpoint (runs/testbed_teacher/checkpoint-<step>)")
    ap.add_argument("--tokenizer", default=None, help="default: the model directory if it has one, else testbed/tokenizer")
    ap.add_argument("--mode", default=None, choices=["vanilla", "ar"], help="default: ar for causal models, else vanilla")
    ap.add_argument("--source", default="testbed", help="testbed | real100 | hub | path (d2f.data.gsm8k.load_gsm8k)")
    ap.add_argument("--limit", type=positive_int, default=500)
    ap.add_argument("--gen", type=int, default=128, help="answer budget (gen length) in tokens")
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--steps", type=int, default=None, help="vanilla: total forwards (default = gen)")
    ap.add_argument("--batch-size", type=positive_int, default=50)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=None, help="write per-problem records (jsonl) here")
    a = ap.parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    tok_path = a.tokenizer or (a.model if (Path(a.model) / "tokenizer.json").is_file()
                               else str(Path(__file__).resolve().parents[1] / "testbed" / "tokenizer"))
    tokenizer = load_tokenizer(tok_path)
    model = from_pretrained(a.model, dtype=torch.float32)  # a checkpoint-<step> directory is a model dir too
    mode = a.mode or ("ar" if model.config.is_causal else "vanilla")
    problems = load_gsm8k(a.source, "test", a.limit)
    summary, records = evaluate(model, tokenizer, problems, mode, a.gen, a.block, a.steps, a.batch_size)
    summary["model"], summary["source"] = a.model, a.source
    if a.out:
        Path(a.out).write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"{a.model} [{mode}] accuracy {summary['accuracy']:.3f} on {summary['n']} {a.source} problems, "
          f"avg answer {summary['avg_answer_tokens']:.1f} tokens, {summary['wall_s']:.0f}s")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    from d2f.errors import run_main
    raise SystemExit(run_main(main))
