"""GSM8K accuracy and speed of one model + decoding mode.

    python -m infer.eval --mode d2f --limit 50                     # the testbed student on the testbed test set
    python -m infer.eval --mode vanilla --data real100 --shots 4    # the 100 real GSM8K questions
    python -m infer.eval --model GSAI-ML/LLaDA-8B-Instruct --mode fast-dllm --cache dual \\
        --rule threshold --max-new-tokens 256 --block-size 32 --data hub --device cuda --dtype bfloat16

Writes to --output-dir:
- predictions.jsonl: one line per problem (index, question, gold, output, extracted, correct, tokens,
  nfe, wall_time, ...), appended as soon as a batch finishes. Running the same command again resumes:
  finished indices are skipped, and the final figures are computed from the file, so they are the
  same as those of an uninterrupted run.
- run.json: the settings the predictions were made with; resuming with different settings is an
  error (use --overwrite or another --output-dir) so a file never mixes two configurations.
- summary.json: accuracy, tokens/s, NFE, tokens per forward, answer length, latency p50/p95.

How speed is counted (docs/design.md §3, "How speed is counted"): answer tokens up to and including the first EOS (the engine's
`Result.num_tokens`), divided by the wall time of the generate calls, prompt processing included.
We read the clock ourselves around each call, after synchronising the device, so the figure does not
depend on how the engine times itself. With --batch-size > 1 a problem's latency is its batch's time.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from d2f.errors import UserError, check_output_dir
from infer import prompts as P
from infer.cli_args import add_compile_arg, add_decode_args, decode_config_from_args

PREDICTIONS = "predictions.jsonl"
SUMMARY = "summary.json"
RUN = "run.json"
# A base model keeps writing the next "Question: ..." after its answer; everything from there on is
# not part of the answer (lm-evaluation-harness's gsm8k task stops at the same string).


class RunMismatch(UserError):
    pass


# ----------------------------------------------------------------------------- problems and prompts

def load_problems(data: str = "testbed", split: str = "test", limit: int | None = None) -> list[dict]:
    from d2f.data.gsm8k import load_gsm8k

    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    problems = load_gsm8k(data, split=split, limit=limit)
    if not problems:
        raise UserError(f"no problems in {data!r} ({split} split)")
    return problems


def make_prompts(tokenizer, problems: list[dict], shots: int = 4, source: str = "testbed", chat="auto",
                 shot_seed: int = 1234, shots_from: str | None = None) -> list[str]:
    examples = P.select_shots(shots, source=source, exclude=[p["question"] for p in problems], seed=shot_seed,
                              shots_from=shots_from)
    return [P.build_prompt(tokenizer, p["question"], examples, chat=chat) for p in problems]


# ----------------------------------------------------------------------------- timing

def model_device(model):
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return None


def synchronize(device) -> None:
    """Wait for queued GPU work, so that the clock measures the work and not its launch."""
    import torch

    if device is not None and getattr(device, "type", str(device)).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize(device)


def _generate_fn(generate_fn):
    if generate_fn is not None:
        return generate_fn
    from infer.api import generate

    return generate


def warmup(model, tokenizer, prompt: str, cfg, generate_fn: Callable | None = None) -> None:
    """One short untimed decode (one block), so first-call costs (allocator, kernels, caches) stay out of the
    figures."""
    generate = _generate_fn(generate_fn)
    short = cfg
    gen = min(cfg.max_new_tokens, cfg.block_size)
    if gen < cfg.max_new_tokens:
        changes = {"max_new_tokens": gen}
        if cfg.steps is not None:  # keep the tokens per step of the real run
            changes["steps"] = max(1, cfg.steps * gen // cfg.max_new_tokens)
        try:
            short = dataclasses.replace(cfg, **changes)
        except ValueError:  # the mode rejects the shortened lengths: warm up with the real ones
            short = cfg
    generate(model, tokenizer, [prompt], short, batch_size=1)
    synchronize(model_device(model))


def compile_warmup(model, tokenizer, prompts: list[str], cfg, batch_size: int,
                   generate_fn: Callable | None = None) -> None:
    """With a compiled model: the first batch decoded once in full, untimed, so that every specialisation the
    timed run meets (batch N and 1, the prompt, windows that reach the cache's end) compiles here and not
    inside the timings, as a one-block warm-up would leave some to."""
    from infer.graphs import COMPILE_NOTE

    print(COMPILE_NOTE + "; the first batch is decoded once, untimed, to compile them", file=sys.stderr, flush=True)
    _generate_fn(generate_fn)(model, tokenizer, prompts[:batch_size], cfg, batch_size=batch_size)
    synchronize(model_device(model))


# ----------------------------------------------------------------------------- the predictions file

def read_predictions(path: Path) -> dict[int, dict]:
    """index -> record. A line cut short by an interruption is dropped (and the file rewritten without it)."""
    if not path.exists():
        return {}
    records, clean = {}, True
    dropped = 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
            if not RECORD_KEYS <= set(rec):
                raise KeyError("incomplete record")
            records[int(rec["index"])] = rec
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            clean = False
            dropped += line.strip() != ""
    if not clean:
        print(f"{path}: {dropped} unreadable or incomplete line(s) dropped; those problems are decoded again",
              file=sys.stderr)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records.values()))
        os.replace(tmp, path)
    return records


def unfinished(out_dir, n: int) -> int:
    """How many of the first n problems have no prediction in out_dir yet."""
    done = read_predictions(Path(out_dir) / PREDICTIONS)
    return sum(i not in done for i in range(n))


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def check_run(out_dir: Path, meta: dict, overwrite: bool) -> None:
    """Refuse to resume predictions made with other settings; --overwrite starts again."""
    run_file, pred_file = out_dir / RUN, out_dir / PREDICTIONS
    meta = _jsonable(meta)
    if overwrite:
        for f in (pred_file, out_dir / SUMMARY):
            f.unlink(missing_ok=True)
    elif pred_file.exists() and not run_file.exists():
        raise RunMismatch(f"{str(out_dir)!r} holds {PREDICTIONS} but no {RUN}, so the settings they were made with "
                          "are unknown. Pass --overwrite to start again or choose another --output-dir.")
    elif run_file.exists() and pred_file.exists():
        try:
            old = json.loads(run_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = None
        if not isinstance(old, dict):
            raise RunMismatch(f"{str(run_file)!r} is not a run record (corrupt or edited), so the settings of the "
                              "predictions beside it are unknown. Pass --overwrite to start again or choose another "
                              "--output-dir.")
        diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
        if diff:
            details = "; ".join(f"{k}: {old.get(k)!r} -> {meta.get(k)!r}" for k in diff)
            raise RunMismatch(f"{str(out_dir)!r} holds predictions made with other settings ({details}). "
                              "Pass --overwrite to start again or choose another --output-dir.")
    out_dir.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps(meta, indent=2) + "\n")


# ----------------------------------------------------------------------------- figures

def summarize(records: list[dict]) -> dict:
    """Every figure from the per-problem records (so a resumed run gives the same figures)."""
    n = len(records)
    if n == 0:
        raise ValueError("no predictions to summarise")
    tokens = np.array([r["tokens"] for r in records], dtype=np.float64)
    nfe = np.array([r["nfe"] for r in records], dtype=np.float64)
    latency = np.array([r["wall_time"] for r in records], dtype=np.float64)
    # a batch's time counts once however many problems it answered
    batch_time = {r["batch_id"]: r["wall_time"] for r in records}
    total_time = float(sum(batch_time.values()))
    correct = int(sum(bool(r["correct"]) for r in records))
    return {
        "n": n,
        "correct": correct,
        "accuracy": correct / n,
        "tokens_per_s": float(tokens.sum() / total_time) if total_time > 0 else float("nan"),
        "answer_tokens_mean": float(tokens.mean()),
        "nfe_mean": float(nfe.mean()),
        "tokens_per_forward": float(tokens.sum() / nfe.sum()) if nfe.sum() > 0 else float("nan"),
        "latency_p50_s": float(np.percentile(latency, 50)),
        "latency_p95_s": float(np.percentile(latency, 95)),
        "tokens_total": int(tokens.sum()),
        "nfe_total": int(nfe.sum()),
        "wall_time_total_s": total_time,
    }


RECORD_KEYS = {"index", "question", "gold", "output", "extracted", "correct", "tokens", "nfe", "tokens_per_forward",
               "wall_time", "engine_wall_time", "batch_id", "batch_size"}  # what make_record writes


def make_record(index: int, problem: dict, result, wall_time: float, batch_id: int, batch_size: int) -> dict:
    from d2f.data.extract import extract_answer, is_correct

    answer = P.cut_at_stop(result.text)
    return {
        "index": index,
        "question": problem["question"],
        "gold": problem["final"],
        "output": result.text,
        "extracted": extract_answer(answer),
        "correct": bool(is_correct(answer, problem["final"])),
        "tokens": int(result.num_tokens),
        "nfe": int(result.nfe),
        "tokens_per_forward": float(result.tokens_per_forward),
        "wall_time": wall_time,
        "engine_wall_time": float(result.wall_time),
        "batch_id": batch_id,
        "batch_size": batch_size,
    }


# ----------------------------------------------------------------------------- the loop

def evaluate(model, tokenizer, problems: list[dict], prompts: list[str], cfg, out_dir, *, batch_size: int = 1,
             meta: dict | None = None, overwrite: bool = False, progress: bool = True, desc: str = "eval",
             generate_fn: Callable | None = None, clock: Callable[[], float] = time.perf_counter) -> dict:
    """Decode every problem not yet in out_dir/predictions.jsonl, then summarise all of them."""
    if len(prompts) != len(problems):
        raise ValueError(f"{len(prompts)} prompts for {len(problems)} problems")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    generate = _generate_fn(generate_fn)
    out_dir = Path(out_dir)
    meta = dict(meta or {}, decode=dataclasses.asdict(cfg), batch_size=batch_size)
    check_run(out_dir, meta, overwrite)
    pred_file = out_dir / PREDICTIONS
    done = read_predictions(pred_file)
    todo = [i for i in range(len(problems)) if i not in done]
    device = model_device(model)

    from tqdm import tqdm

    bar = tqdm(total=len(problems), initial=len(problems) - len(todo), desc=desc, disable=not progress,
               dynamic_ncols=True, file=sys.stderr)
    finished = [done[i] for i in range(len(problems)) if i in done]
    with pred_file.open("a") as f:
        for start in range(0, len(todo), batch_size):
            idx = todo[start:start + batch_size]
            synchronize(device)
            t0 = clock()
            results = generate(model, tokenizer, [prompts[i] for i in idx], cfg, batch_size=len(idx))
            synchronize(device)
            wall = clock() - t0
            for i, res in zip(idx, results, strict=True):
                rec = make_record(i, problems[i], res, wall, batch_id=idx[0], batch_size=len(idx))
                f.write(json.dumps(rec) + "\n")
                finished.append(rec)
            f.flush()  # a finished batch survives an interruption
            s = summarize(finished)
            bar.set_postfix(acc=f"{s['accuracy']:.3f}", tok_s=f"{s['tokens_per_s']:.1f}")
            bar.update(len(idx))
    bar.close()
    records = [r for r in read_predictions(pred_file).values() if r["index"] < len(problems)]
    records.sort(key=lambda r: r["index"])
    summary = summarize(records)
    (out_dir / SUMMARY).write_text(json.dumps({**summary, "settings": _jsonable(meta)}, indent=2) + "\n")
    return summary


# ----------------------------------------------------------------------------- command line

def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="testbed",
                   help="testbed | real100 (the 100 real GSM8K questions) | hub (openai/gsm8k) | a .jsonl/.parquet path")
    p.add_argument("--split", default="test",
                   help="split of --data (default test). --data testbed also has 'dev': 500 more held-out problems, "
                   "none of them in test, for choosing settings without tuning on the test figures")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N problems")
    p.add_argument("--shots", type=int, default=None,
                   help="worked examples before each question (default: 4; 0 for --data testbed, whose models "
                        "were trained on the bare question)")
    p.add_argument("--shots-from", default=None,
                   help="source of the shots' train split (default: --data itself for testbed/hub, else testbed)")
    p.add_argument("--shot-seed", type=int, default=1234)
    p.add_argument("--chat", default="auto", choices=P.CHAT_CHOICES,
                   help="wrap the prompt in the tokenizer's chat template (auto: when it has one)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    p.add_argument("--cuda-graphs", action="store_true", help="static shapes, each forward one CUDA-graph replay "
                                                              "(infer.graphs; same tokens, fewer launches)")
    add_compile_arg(p)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, one per core)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m infer.eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="hub id or checkpoint dir (default: the testbed model for --mode)")
    p.add_argument("--adapter", default=None, help="D2F LoRA adapter dir (default for --mode d2f: the testbed student)")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir or hub id (default: the model's, else the testbed's)")
    p.add_argument("--output-dir", default=None, help="default: outputs/eval/<data>-<mode>")
    p.add_argument("--overwrite", action="store_true", help="discard earlier predictions in --output-dir")
    p.add_argument("--warmup", action="store_true", help="one untimed short decode before the timed ones")
    add_eval_args(p)
    add_decode_args(p)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    cfg = decode_config_from_args(args)
    from infer.api import load
    for name in ("batch_size", "limit", "threads"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
    if args.shots is not None and args.shots < 0:
        raise UserError(f"--shots must be >= 0, got {args.shots}")

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    if args.shots is None:
        args.shots = P.default_shots(args.data)
    data_name = Path(args.data).stem if args.data not in ("testbed", "real100", "hub") else args.data
    out_dir = Path(args.output_dir or Path("outputs") / "eval" / f"{data_name}-{cfg.mode}")
    check_output_dir(out_dir, "--output-dir")
    out_dir.mkdir(parents=True, exist_ok=True)  # fails here, before the model loads, on a read-only location
    if not os.access(out_dir, os.W_OK):
        raise UserError(f"--output-dir {str(out_dir)!r} is not writable; choose another")
    problems = load_problems(args.data, args.split, args.limit)
    model, tokenizer = load(args.model, cfg.mode, adapter=args.adapter, device=args.device, dtype=args.dtype,
                            cuda_graphs=args.cuda_graphs, compile=args.compile,
                            tokenizer=args.tokenizer)
    prompts = make_prompts(tokenizer, problems, args.shots, args.data, args.chat, args.shot_seed, args.shots_from)
    meta = {"model": args.model, "adapter": args.adapter, "tokenizer": args.tokenizer, "data": args.data, "split": args.split,
            "shots": args.shots, "shots_from": args.shots_from, "shot_seed": args.shot_seed,
            "chat": P.use_chat(tokenizer, args.chat), "device": args.device, "dtype": args.dtype}
    if args.compile:
        compile_warmup(model, tokenizer, prompts, cfg, args.batch_size)
    elif args.warmup:
        warmup(model, tokenizer, prompts[0], cfg)
    summary = evaluate(model, tokenizer, problems, prompts, cfg, out_dir, batch_size=args.batch_size, meta=meta,
                       overwrite=args.overwrite, progress=not args.no_progress, desc=cfg.mode)
    print(f"{cfg.mode}: accuracy {summary['accuracy']:.3f} ({summary['correct']}/{summary['n']}), "
          f"{summary['tokens_per_s']:.1f} tokens/s, NFE {summary['nfe_mean']:.1f}, "
          f"{summary['tokens_per_forward']:.2f} tokens/forward, answer {summary['answer_tokens_mean']:.1f} tokens "
          f"-> {out_dir}")
    return summary


if __name__ == "__main__":
    from d2f.errors import run_main
    raise SystemExit(run_main(main))
