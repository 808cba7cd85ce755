"""The teacher's vanilla decoding when each forward sees only what a block-causal model sees.

A block-causal model decoding block k attends to the prompt and blocks 1 to k; a full-attention teacher also reads
the masked slots of every later block, which hold no tokens. `Horizon` hides those keys: in each forward the
answer is visible only to the end of the block being decoded (plus `--extra-blocks` more), with full attention
over what is left, which is the same as cutting the sequence there. Decoding is otherwise LLaDA's vanilla
decoding, unchanged. testbed/student/README.md ("Where the 2.6 points go") says what the figures mean.

    python scripts/teacher_horizon.py                      # the 500 held-out problems, about 10 min on 2 cores
    python scripts/teacher_horizon.py --extra-blocks 1     # one more block of masks visible
    python scripts/teacher_horizon.py --extra-blocks 8     # every block visible: plain vanilla decoding
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from d2f import masks  # noqa: E402
from d2f.errors import positive_int  # noqa: E402


class Horizon(nn.Module):
    """Wraps a full-attention dLLM for vanilla decoding (no KV cache): every forward hides the keys after the end
    of the current block + `extra` blocks. The current block of a row is the one holding its first mask; the
    answer starts `gen_len` slots before the buffer's end, as `infer.batch.make_batch` lays it out."""

    def __init__(self, model, block_size: int, gen_len: int, extra: int = 0):
        super().__init__()
        self.model, self.config, self.attn_backend = model, model.config, model.attn_backend
        self.block_size, self.gen_len, self.extra = block_size, gen_len, extra

    def forward(self, input_ids, position_ids=None, mask=None, cache=None, offset=0, **kw):
        if cache is not None or offset:
            raise ValueError("Horizon wraps whole-sequence forwards (vanilla decoding), not cached ones")
        B, L = input_ids.shape
        P = L - self.gen_len  # where every row's answer starts
        col = torch.arange(L, device=input_ids.device)
        first = torch.where(input_ids == self.config.mask_token_id, col, L).min(-1).values  # (B,) first mask
        end = masks.block_end(first, P, self.block_size) + self.extra * self.block_size  # (B,) visible up to here
        visible = col[None, :] < torch.where(first < L, end, L)[:, None]  # (B, L); no mask left: all visible
        if mask is not None and mask.key_valid is not None:  # the batch's padding stays hidden
            visible = visible & mask.key_valid[:, :L]
        return self.model(input_ids, position_ids=position_ids, mask=masks.full(visible), **kw)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="the teacher (default: testbed/teacher)")
    ap.add_argument("--limit", type=positive_int, default=500, help="held-out problems (default 500)")
    ap.add_argument("--block-size", type=positive_int, default=16, help="decoding block (default 16, the student's)")
    ap.add_argument("--extra-blocks", type=int, default=0, help="blocks visible after the current one (default 0)")
    ap.add_argument("--max-new-tokens", type=positive_int, default=128, help="answer slots (default 128)")
    ap.add_argument("--batch-size", type=positive_int, default=50)
    ap.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    ap.add_argument("--output-dir", default=None, help="predictions and summary, as infer.eval writes them "
                                                       "(default: outputs/teacher_horizon/extra-<N>)")
    ap.add_argument("--overwrite", action="store_true", help="start again instead of resuming --output-dir")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    """Decodes and scores the problems with `infer.eval.evaluate` (the prompts, scoring and summary of
    `python -m infer.eval`, so the figures compare with its rows); returns its summary."""
    args = parse_args(argv)
    from d2f.errors import UserError, check_output_dir
    from infer.api import DecodeConfig, load
    from infer.eval import evaluate, load_problems, make_prompts

    if args.extra_blocks < 0:
        raise UserError(f"--extra-blocks {args.extra_blocks} is negative: give 0 (only the current block) or more")
    if args.max_new_tokens % args.block_size:
        raise UserError(f"--block-size {args.block_size} does not divide --max-new-tokens {args.max_new_tokens}: "
                        "pick one that does")
    out_dir = Path(args.output_dir or Path("outputs") / "teacher_horizon" / f"extra-{args.extra_blocks}")
    check_output_dir(out_dir, "--output-dir")
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher, tok = load(args.model, "vanilla")
    model = Horizon(teacher, args.block_size, args.max_new_tokens, args.extra_blocks)
    cfg = DecodeConfig(mode="vanilla", max_new_tokens=args.max_new_tokens, block_size=args.block_size,
                       steps=args.max_new_tokens)
    problems = load_problems("testbed", "test", args.limit)
    prompts = make_prompts(tok, problems, shots=0, source="testbed")
    meta = {"model": args.model, "extra_blocks": args.extra_blocks}
    s = evaluate(model, tok, problems, prompts, cfg, out_dir, batch_size=args.batch_size, meta=meta,
                 overwrite=args.overwrite, progress=not args.no_progress, desc=f"horizon +{args.extra_blocks}")
    print(f"teacher, vanilla, block {args.block_size}, answer visible to the end of the current block + "
          f"{args.extra_blocks}: {s['accuracy']:.1%} ({s['correct']}/{s['n']}), answer length "
          f"{s['answer_tokens_mean']:.1f}, NFE {s['nfe_mean']:.0f} -> {out_dir}")
    return s


if __name__ == "__main__":
    from d2f.errors import run_main
    raise SystemExit(run_main(main))
