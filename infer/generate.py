"""Decode prompts from the command line, streaming the answer as it is committed.

    python -m infer.generate                                   # the shipped testbed, D2F student
    python -m infer.generate --mode fast-dllm --cache dual --prompt "What is 12 * 7?"
    python -m infer.generate --model GSAI-ML/LLaDA-8B-Instruct --mode d2f \\
        --adapter path/to/d2f_lora --device cuda --dtype bfloat16 --max-new-tokens 512 --block-size 32
    python -m infer.generate --mode ar --model Qwen/Qwen2.5-0.5B-Instruct --input-file questions.jsonl

Every `infer.api.DecodeConfig` field is an option (--mode, --max-new-tokens, --block-size, --steps,
--temperature, --cache, --rule, --threshold, --factor, --tau-add, --tau-act, --tau-conf, --seed).
Per request it prints: tokens (answer up to and including the first EOS), NFE, tokens per
forward, wall time and tokens/s. `--trace FILE` writes every step as a JSON line.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from d2f.errors import UserError

DEFAULT_PROMPT = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                  "How many clips did Natalia sell altogether in April and May?")


def parse_args(argv=None) -> argparse.Namespace:
    from infer.cli_args import add_compile_arg, add_decode_args
    p = argparse.ArgumentParser(prog="python -m infer.generate", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="preset, hub id or checkpoint dir (default: the testbed model "
                                                 "for the mode)")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir or hub id (default: the model's own; the testbed's "
                                                     "when --model is not given)")
    p.add_argument("--adapter", default=None, help="PEFT LoRA adapter dir, merged into the model")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--input-file", default=None, help="jsonl with a 'prompt' or 'question' field per line")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--cuda-graphs", action="store_true", help="static shapes, each forward one CUDA-graph replay "
                                                              "(infer.graphs; same tokens, fewer launches)")
    add_compile_arg(p)
    p.add_argument("--no-chat-template", action="store_true", help="use prompts as given")
    p.add_argument("--trace", default=None, metavar="FILE", help="write every step as JSON lines")
    p.add_argument("--no-stream", action="store_true", help="print answers only when complete")
    p.add_argument("--show-masks", action="store_true",
                   help="batch size 1: print the answer after every forward, masks as '_' (not for --mode ar)")
    add_decode_args(p)
    return p.parse_args(argv)


def read_prompts(args) -> list[str]:
    """--prompt values, then the --input-file lines; the built-in example only when neither is given."""
    prompts = list(args.prompt)
    if args.input_file:
        from d2f.data.records import numbered_jsonl
        n_read = 0
        for n, row in numbered_jsonl(args.input_file, "--input-file"):
            text = row.get("prompt", row.get("question"))
            if not isinstance(text, str) or not text.strip():
                raise UserError(f"{args.input_file}:{n}: no non-empty 'prompt' or 'question' string (keys: "
                                f"{sorted(row)})")
            prompts.append(text)
            n_read += 1
        if n_read == 0:
            raise UserError(f"--input-file {args.input_file!r} holds no prompts (one JSON object per line)")
    for i, p in enumerate(prompts):
        if not p.strip():
            raise UserError(f"prompt {i} is empty; give some text")
    return prompts or [DEFAULT_PROMPT]


def check_output_file(path: str | None, option: str) -> None:
    """Fail before the model loads when an output file cannot be written."""
    if path is None:
        return
    parent = Path(path).expanduser().resolve().parent
    if not parent.is_dir():
        raise UserError(f"{option} {path!r}: the directory {str(parent)!r} does not exist; create it first")
    if Path(path).is_dir():
        raise UserError(f"{option} {path!r} is a directory; give a file name")
    if not os.access(parent, os.W_OK):
        raise UserError(f"{option} {path!r}: the directory {str(parent)!r} is not writable")


def main(argv=None) -> int:
    return run(parse_args(argv))


def run(args: argparse.Namespace) -> int:
    from infer.api import format_prompt, generate, load, special_ids
    from infer.cli_args import decode_config_from_args
    from infer.stream import MaskRenderer, PrefixStreamer, write_trace

    cfg = decode_config_from_args(args)
    if args.batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    if args.show_masks and (args.batch_size != 1 or cfg.mode == "ar"):
        raise UserError("--show-masks needs --batch-size 1 and a diffusion mode (not ar)")
    prompts = read_prompts(args)
    check_output_file(args.trace, "--trace")
    model, tok = load(args.model, cfg.mode, adapter=args.adapter, device=args.device, dtype=args.dtype,
                      cuda_graphs=args.cuda_graphs, compile=args.compile,
                      tokenizer=args.tokenizer)
    if tok is None:
        raise UserError(f"no tokenizer found for model {args.model!r}; pass --tokenizer")
    if args.compile:
        from infer.graphs import COMPILE_NOTE
        print(COMPILE_NOTE, file=sys.stderr, flush=True)
    texts = [format_prompt(tok, p, chat=not args.no_chat_template) for p in prompts]
    mask_id, eos_id, _ = special_ids(model, tok)
    streamer = on_step = None
    if args.show_masks:
        if args.batch_size != 1 or cfg.mode == "ar":
            raise UserError("--show-masks needs --batch-size 1 and a diffusion mode (not ar)")
        on_step = MaskRenderer(tok, mask_id)
    elif args.batch_size == 1 and not args.no_stream:
        on_step = streamer = PrefixStreamer(tok, eos_id)
    trace_fh = open(args.trace, "w") if args.trace else None
    total_tokens, total_time, total_nfe = 0, 0.0, 0
    try:
        for s in range(0, len(texts), args.batch_size):
            chunk = texts[s:s + args.batch_size]
            if on_step is not None:  # batch size 1: the answer is shown as it is decoded
                print(f"### request {s}: {prompts[s]}\n", flush=True)
            results = generate(model, tok, chunk, cfg, batch_size=len(chunk), on_step=on_step,
                               trace=trace_fh is not None)
            for i, res in enumerate(results):
                if streamer is not None:
                    streamer.finish(res.text)
                elif on_step is not None:
                    print(res.text)
                else:
                    print(f"### request {s + i}: {prompts[s + i]}\n{res.text}")
                print(f"[request {s + i}] {res.stats()}", flush=True)
                if trace_fh is not None:
                    write_trace(trace_fh, s + i, chunk[i], res)
            total_tokens += sum(r.num_tokens for r in results)
            total_nfe += sum(r.nfe for r in results)
            total_time += results[0].wall_time
    finally:
        if trace_fh is not None:
            trace_fh.close()
    if len(texts) > 1:
        print(f"[total] requests={len(texts)} tokens={total_tokens} nfe={total_nfe} wall={total_time:.3f}s "
              f"tokens/s={total_tokens / max(total_time, 1e-9):.1f}")
    return 0


if __name__ == "__main__":
    from d2f.errors import run_main
    raise SystemExit(run_main(main))
