"""Teacher-generated answers for D2F distillation: prompts in, {"question", "answer"} jsonl out.

D2F distils the teacher's own behaviour, so the answers the student trains on come from the
teacher (the public recipe used Bespoke-Stratos-17k prompts answered by the model). This script
decodes every prompt with the teacher through the inference engine (`infer.api.generate`,
batched) and writes one JSON object per line:

    {"question": <prompt text>, "answer": <teacher's answer text>, "num_tokens": N, "finished": bool,
     "reference": <the source's own answer, if any>, "final": <gold number, testbed only>}

Lines go to <out>.tmp as they are decoded (moved to <out> at the end); run the same command again after an
interruption and it keeps the answers already there and decodes only the rest (with other decoding settings
it starts over).

Examples:
    # the testbed: its own train problems (d2f.data.gsm), answered by the testbed teacher
    python scripts/make_distill_data.py --model testbed/teacher --tokenizer testbed/tokenizer \\
        --source testbed --n 2000 --out data/distill/testbed_train.jsonl
    # any jsonl / hub data set with a prompt field
    python scripts/make_distill_data.py --model GSAI-ML/LLaDA-8B-Instruct --source prompts.jsonl \\
        --prompt-field question --out data/distill/llada.jsonl --device cuda --dtype bfloat16 --batch-size 32
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from d2f.errors import UserError, check_output_location, positive_int  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="the teacher: checkpoint dir, hub id or preset")
    ap.add_argument("--tokenizer", default=None, help="default: the model's own")
    ap.add_argument("--source", required=True, help="'testbed' (d2f.data.gsm train problems), a .jsonl or a hub id")
    ap.add_argument("--split", default="train", help="hub split")
    ap.add_argument("--prompt-field", default=None, help="default: 'prompt' or 'question'")
    ap.add_argument("--n", type=positive_int, default=None, help="number of prompts (required for --source testbed)")
    ap.add_argument("--seed", type=int, default=0, help="testbed problem generator seed")
    ap.add_argument("--out", required=True, help="output .jsonl")
    ap.add_argument("--mode", default="vanilla", choices=["vanilla", "fast-dllm"],
                    help="teacher decoder (vanilla = one token per forward, the teacher's best quality)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--batch-size", type=positive_int, default=16)
    ap.add_argument("--no-chat", action="store_true", help="do not wrap prompts in the chat template")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    return ap.parse_args(argv)


def load_prompts(args) -> list[dict]:
    """[{"question", optional "reference", optional "final"}] -- checked before any decoding."""
    if args.source == "testbed":
        if not args.n:
            raise UserError("--source testbed needs --n (how many train problems to generate)")
        from d2f.data.gsm import make_problems
        return [{"question": p["question"], "reference": p["answer"], "final": p["final"]}
                for p in make_problems("train", args.n, seed=args.seed)]
    from d2f.data.records import ANSWER_FIELDS, read_records, resolve_fields
    records = read_records(args.source, args.split, args.n)
    af = next((f for f in ANSWER_FIELDS if f in records[0]), None)  # a reference answer, when the data has one
    # the prompt field, and every record has it (and the answer field, when there is one)
    pf, af = resolve_fields(records, args.source, args.prompt_field, af, need_answer=af is not None,
                            set_hint="--{}-field")
    bad = next((i for i, r in enumerate(records) if not isinstance(r[pf], str) or not r[pf].strip()), None)
    if bad is not None:
        raise UserError(f"record {bad} of {args.source!r}: field {pf!r} is {records[bad][pf]!r}, not a non-empty string")
    return [{"question": r[pf], **({"reference": r[af]} if af else {})} for r in records]


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        from infer.api import DecodeConfig, format_prompt, generate, load
    except ImportError as e:
        raise UserError(f"the inference engine is not installed ({e}); it lives in infer/ of this repository: "
                         "run from the repository root with `pip install -e .`") from None
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {args.out!r} is a directory; pass the path of the .jsonl file to write")
    check_output_location(out, "--out")
    problems = load_prompts(args)
    cfg = DecodeConfig(mode=args.mode, max_new_tokens=args.max_new_tokens, block_size=args.block_size)
    cfg.validate()
    model, tok = load(args.model, mode=args.mode, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer)
    if tok is None:
        raise UserError(f"no tokenizer found for {args.model!r}; pass --tokenizer")
    from d2f.data.extract import is_correct
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    settings = tmp.with_name(tmp.name + ".json")  # what wrote tmp: a run with other settings starts over
    mine = settings_of(args)
    same = settings.is_file() and json.loads(settings.read_text()) == mine
    kept = resume_lines(tmp, problems) if same else []
    if kept:
        print(f"resuming: {len(kept)} answers already in {tmp}", flush=True)
    elif tmp.is_file():
        print(f"{tmp} was written with other settings or holds no complete answer: starting over", flush=True)
    settings.write_text(json.dumps(mine))
    done = len(kept)
    unfinished = sum(not record["finished"] for _, record in kept)
    correct = sum(is_correct(record["answer"], p["final"]) for (_, record), p in zip(kept, problems) if "final" in p)
    t0 = time.time()
    chunk = args.batch_size * 4  # write (and report) progress every few batches
    if kept:  # drop what follows the kept lines (a line cut off), atomically: the kept ones are never at risk
        rewrite = tmp.with_name(tmp.name + "2")
        rewrite.write_text("".join(line for line, _ in kept))
        os.replace(rewrite, tmp)
    with open(tmp, "a" if kept else "w") as f:
        for s in range(done, len(problems), chunk):
            part = problems[s:s + chunk]
            prompts = [format_prompt(tok, p["question"], chat=not args.no_chat) for p in part]
            results = generate(model, tok, prompts, cfg, batch_size=args.batch_size)
            for p, r in zip(part, results):
                finished = _ends_with_eos(r, model)  # token_ids end at the first EOS when there is one
                unfinished += not finished
                if "final" in p:
                    correct += is_correct(r.text, p["final"])
                f.write(json.dumps({"question": p["question"], "answer": r.text.strip(), "num_tokens": r.num_tokens,
                                    "finished": finished, **{k: p[k] for k in ("reference", "final") if k in p}}) + "\n")
            f.flush()  # an interrupted run resumes from the answers on disk
            done += len(part)
            rate = (done - len(kept)) / (time.time() - t0)
            print(f"{done}/{len(problems)} prompts, {rate:.2f}/s, eta {(len(problems) - done) / rate:.0f}s", flush=True)
    os.replace(tmp, out)
    settings.unlink()
    acc = f", teacher accuracy {correct / done:.1%}" if "final" in problems[0] else ""
    print(f"wrote {done} answers to {out} ({unfinished} hit max_new_tokens without EOS{acc})")


def settings_of(args) -> dict:
    """What decides the answers (not --device or --batch-size: decoding is batch-independent)."""
    return {k: getattr(args, k) for k in ("model", "tokenizer", "source", "split", "prompt_field", "seed", "mode",
                                          "max_new_tokens", "block_size", "no_chat", "dtype")}


def resume_lines(tmp: Path, problems: list[dict]) -> list[tuple[str, dict]]:
    """(line, record) for the complete lines an interrupted run left in `tmp`, while they answer `problems` in
    order (decoding is deterministic and batch-independent, so the rest can be decoded as if nothing had
    stopped); [] if none."""
    if not tmp.is_file():
        return []
    kept = []
    for line, p in zip(tmp.read_text().splitlines(keepends=True), problems):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break  # the line being written when the run stopped
        if not line.endswith("\n") or record.get("question") != p["question"]:
            break  # not this run's problems (other --n/--seed/--source): start over from there
        kept.append((line, record))
    return kept


def _ends_with_eos(result, model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    eos = getattr(base.config, "eos_token_id", None)
    return bool(result.token_ids) and result.token_ids[-1] == eos


if __name__ == "__main__":
    from d2f.errors import run_main
    raise SystemExit(run_main(main))
