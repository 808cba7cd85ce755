"""How often a model computes a GSM8K calculator result with nothing after it visible.

For every `<<a*b=c>>` result in the gold answers of the held-out testbed problems: the prompt and the answer
before the result are clean, the result and everything after it (to the gen length) are masks, which is the
state a decoder is in when it reaches a result. A model passes a result when its argmax at the result's slots,
all in one forward, is the result's tokens. The rows: the teacher with full attention (how vanilla decoding
sees the state); the same with the sequence cut at the end of the result's block (block 16 from the prompt's
end), so that it sees only the positions a block-causal model sees there, and cut one block later; the D2F
student block-causally (as D2F decodes); and the teacher's own weights block-causally (no adapter).
testbed/student/README.md ("Where the 2.6 points go") says what the figures mean for the student's accuracy.

    python scripts/result_accuracy.py                 # the 500 held-out problems, about 2 min on 2 cores
    python scripts/result_accuracy.py --limit 50
    python scripts/result_accuracy.py --model runs/testbed_teacher_results  # a teacher alone: no student row

The student row needs an adapter: --adapter, or the shipped student when --model is left at the testbed
teacher. A teacher given alone gets its rows only, which say how far its weights fall under block-causal
attention before any adapter exists (the gap D2F distillation has to close).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from d2f.errors import positive_int  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="the teacher (default: testbed/teacher)")
    ap.add_argument("--adapter", default=None, help="the D2F student's adapter (default: testbed/student "
                    "with the default --model; none with another --model)")
    ap.add_argument("--limit", type=positive_int, default=500, help="held-out problems (default 500)")
    ap.add_argument("--block-size", type=positive_int, default=16, help="the student's block (default 16)")
    ap.add_argument("--max-new-tokens", type=positive_int, default=128,
                    help="answer slots after the prompt (default 128)")
    ap.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from d2f import masks
    from d2f.data.tokenizer import prompt_ids
    from infer.api import load
    from infer.eval import load_problems
    from train.objectives import number_spans, result_spans

    if args.threads:
        torch.set_num_threads(args.threads)
    teacher, tok = load(args.model, "vanilla")
    # load(model=None) is the shipped student; a model given without an adapter has no student
    student = load(args.model, "d2f", adapter=args.adapter)[0] if args.adapter or args.model is None else None
    vocab_text = [tok.decode([i]) for i in range(len(tok))]
    mask_id = teacher.config.mask_token_id
    # name -> (model, block-causal?, blocks kept after the result's block; None: the whole gen length)
    rows = {"teacher, full attention": (teacher, False, None),
            "teacher, full attention, cut at the end of the result's block": (teacher, False, 0),
            "teacher, full attention, cut one block later": (teacher, False, 1),
            "student, block-causal": (student, True, None),
            "teacher's weights, block-causal (no adapter)": (teacher, True, None)}
    if student is None:
        del rows["student, block-causal"]
    passed = dict.fromkeys(rows, 0)
    n = 0
    with torch.no_grad():
        for p in load_problems("testbed", "test", args.limit):
            prompt = prompt_ids(tok, p["question"])
            P = len(prompt)
            row = prompt + tok(p["answer"], add_special_tokens=False)["input_ids"]
            for s, e, _ in result_spans([sp for sp in number_spans(row, vocab_text) if sp[0] >= P], row, vocab_text):
                x = torch.tensor([row[:s] + [mask_id] * (P + args.max_new_tokens - s)])  # (1, P + gen)
                block_end = int(masks.block_end(torch.tensor(e - 1), P, args.block_size))  # of the result's last slot
                n += 1
                for name, (model, causal, after) in rows.items():
                    cut = x if after is None else x[:, :block_end + after * args.block_size]
                    pattern = masks.block_causal(P, args.block_size) if causal else None
                    passed[name] += model(cut, mask=pattern)[0, s:e].argmax(-1).tolist() == row[s:e]
    print(f"calculator results in the gold answers of {args.limit} held-out problems: {n}")
    print("| model | results right (argmax, one forward) |\n|---|---|")
    for name, k in passed.items():
        print(f"| {name} | {k / max(n, 1):.1%} ({k}/{n}) |")
    return {"results": n, **{name: k for name, k in passed.items()}}


if __name__ == "__main__":
    from d2f.errors import run_main
    raise SystemExit(run_main(main))
