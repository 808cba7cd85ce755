"""The order in which vanilla LLaDA decoding commits a model's answer tokens, for training on the
states that decoding actually visits (`decode_orders` / `decode_order_frac` in train/pretrain.py; the
loss on them is train/objectives.py's `mean_masked_ce`).

    python train/decode_orders.py --model testbed/teacher --n 640 --out runs/decode_orders.pt

A stopped recording continues where it stopped when run again with the same arguments (`<out>.partial`).

Why: vanilla decoding (low-confidence remasking, one token per forward, block 32) commits the most
confident masked token of the block first, and a small dLLM is most confident about template tokens
(`>>`, ` years`, `\\n`) several positions ahead. Their position fixes how many digits the numbers before
them get, before those numbers are computed, so such a model's calculator results often get the wrong
number of digits (`<<18-5=3>>`), and the same weights do better decoding strictly left to right than in
their own order. Uniform masking (LLaDA SFT) rarely shows the model those states; this file records
them. What training on them measured is in testbed/teacher/README.md (stages 6 and 7).

For each training problem we run the published vanilla algorithm (`infer/vanilla.py`) with one change:
a committed position takes the *reference* token, not the model's. The positions and their order are
the model's own choice; the states stay consistent with the reference, so every masked position has a
correct target. The result, per problem, is the step (0 .. steps-1) at which each answer slot was
committed; the state before step s masks exactly the slots with order >= s.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from d2f.errors import positive_int
from d2f.yaml_config import ConfigError


@torch.no_grad()
def decode_orders(model, prompts: list[list[int]], references: list[list[int]], gen_len: int, block_size: int,
                  steps: int, batch_size: int = 50, done: torch.Tensor | None = None,
                  on_batch=None) -> torch.Tensor:
    """(N, gen_len) long: the vanilla-decoding step at which each answer slot is committed, with every
    commit replaced by the reference token. references: answer ids, EOS-padded to gen_len.

    done: the first rows, already recorded (a resumed run; each batch is decoded on its own, so they are the
    rows an uninterrupted run gives when its batches start at the same multiples of batch_size);
    on_batch(orders so far (n, gen_len)): called after each batch, for a partial file."""
    from infer.api import DecodeConfig
    from infer.batch import make_batch
    from infer.steps import StepLog
    from infer.vanilla import decode

    if gen_len % block_size:
        raise ConfigError(f"block_size {block_size} does not divide gen_len {gen_len}")
    n_blocks = gen_len // block_size
    if steps > gen_len:  # a step that commits nothing would leave states with no slot to train on
        raise ConfigError(f"steps {steps} is more than gen_len {gen_len}; vanilla decoding commits at least one "
                         f"token per step")
    if steps % n_blocks:
        raise ConfigError(f"steps {steps} is not a multiple of the number of blocks {n_blocks}")
    bad = [i for i, r in enumerate(references) if len(r) != gen_len]
    if bad:
        raise ConfigError(f"reference {bad[0]} has {len(references[bad[0]])} tokens, not gen_len={gen_len}")
    cfg = DecodeConfig(mode="vanilla", max_new_tokens=gen_len, block_size=block_size, steps=steps)
    device = next(model.parameters()).device
    out = torch.empty(len(prompts), gen_len, dtype=torch.long)
    start = 0 if done is None else len(done)
    if start % batch_size and start != len(prompts):
        raise ConfigError(f"{start} recorded rows do not end at a batch boundary of batch_size {batch_size}")
    if done is not None:
        out[:start] = done
    for s0 in range(start, len(prompts), batch_size):
        batch = make_batch(prompts[s0:s0 + batch_size], gen_len, model.config.mask_token_id,
                           model.config.pad_token_id, device)
        ref = torch.tensor(references[s0:s0 + batch_size], dtype=torch.long, device=device)  # (b, G)
        order = torch.full_like(ref, -1)

        def record(info):  # vanilla decoding makes one forward per step: forward k is step k - 1
            order[info["committed"]] = info["step"] - 1
        decode(model, batch, cfg, StepLog(len(ref), on_step=record), reference=ref)
        out[s0:s0 + len(ref)] = order.cpu()
        if on_batch is not None:
            on_batch(out[:s0 + len(ref)])
    return out


def order_state(order: torch.Tensor, step: torch.Tensor, steps_per_block: int,
                block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoding state before `step`: (masked (B, G) = slots committed at `step` or later, loss_at
    (B, G) = the masked slots of the block being decoded, the positions that step chooses among).
    order (B, G); step (B,) long."""
    G = order.shape[1]
    masked = order >= step[:, None]
    blk = torch.div(step, steps_per_block, rounding_mode="floor")  # (B,)
    slot_blk = torch.arange(G, device=order.device)[None] // block_size  # (1, G)
    return masked, masked & (slot_blk == blk[:, None])


def load_decode_orders(path: str | Path) -> dict:
    """{"orders" (N, G) long, "references" (N, G) long, "gen_len", "block_size", "steps", "num_problems",
    "seed" (the problems are the first num_problems of make_problems("train", seed=seed)), "model"}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"decode_orders file {str(path)!r} does not exist; write it with "
                                f"`python train/decode_orders.py --model <teacher> --n <problems> --out {path}`")
    return load_recording(path, "decode_orders", {"orders", "references", "gen_len", "block_size", "steps",
                                                  "num_problems", "seed"}, "train/decode_orders.py")


def load_recording(path: Path, kind: str, keys: set[str], script: str) -> dict:
    """A dict a recorder wrote with torch.save (this file's, train/student_states.py's), checked for `keys`;
    anything else is one clear error naming the file and the script that writes one."""
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or one holding objects we never write
        raise ConfigError(f"{str(path)!r} is not a {kind} file ({type(e).__name__}); write one with "
                          f"`python {script}`") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{str(path)!r} is not a {kind} file (it holds a {type(d).__name__})")
    missing = set(keys) - set(d)
    if missing:
        raise ConfigError(f"{str(path)!r} is not a {kind} file (missing {sorted(missing)})")
    return d


class DecodeStates:
    """Samples decoding states for training: problem i of the file, step s ~ U{0 .. steps-1}, laid out as
    the decoder lays them out (left-padded prompts, `gen_len` answer slots, the padding hidden from
    attention), so the model sees exactly the input it saw when it made that step's choice.

    prompts: the recipe's prompt ids of the file's problems (the first N of its data)."""

    def __init__(self, d: dict, prompts: list[list[int]], mask_id: int, pad_id: int):
        if len(prompts) != len(d["orders"]):
            raise ConfigError(f"{len(prompts)} prompts for {len(d['orders'])} recorded problems")
        self.orders, self.refs, self.prompts = d["orders"], d["references"], prompts
        self.block_size, self.steps = d["block_size"], d["steps"]
        self.spb = self.steps // (d["gen_len"] // self.block_size)
        self.mask_id, self.pad_id = mask_id, pad_id

    def sample(self, n: int, generator: torch.Generator, device="cpu"):
        """n states drawn uniformly: problem i ~ U{0 .. N-1}, step s ~ U{0 .. steps-1}."""
        idx = torch.randint(len(self.prompts), (n,), generator=generator)
        step = torch.randint(self.steps, (n,), generator=generator)
        return self.state(idx, step, device)

    def state(self, idx: torch.Tensor, step: torch.Tensor, device="cpu"):
        """The buffers before step `step[k]` of problem `idx[k]` ->
        (x (n, L), position_ids (n, L), attention Pattern or None, loss_at (n, L), targets (n, L))."""
        from d2f.masks import full
        from infer.batch import make_batch
        ref, order = self.refs[idx], self.orders[idx]  # (n, G)
        masked, loss_at = order_state(order, step, self.spb, self.block_size)
        batch = make_batch([self.prompts[i] for i in idx.tolist()], ref.shape[1], self.mask_id, self.pad_id)
        P = batch.prompt_len
        batch.x[:, P:] = torch.where(masked, torch.full_like(ref, self.mask_id), ref)
        targets = batch.x.clone()
        targets[:, P:] = ref
        at = torch.zeros_like(batch.x, dtype=torch.bool)
        at[:, P:] = loss_at
        kv = batch.key_valid.to(device) if batch.key_valid is not None else None
        pattern = full(kv) if kv is not None else None
        return batch.x.to(device), batch.position_ids.to(device), pattern, at.to(device), targets.to(device)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="the dLLM whose decoding order to record (a model dir)")
    ap.add_argument("--tokenizer", default="testbed/tokenizer")
    ap.add_argument("--n", type=positive_int, required=True, help="the first n testbed train problems")
    ap.add_argument("--seed", type=int, default=0, help="problem generator seed (data.seed of the recipe)")
    ap.add_argument("--max-new-tokens", type=positive_int, default=128,
                    help="answer slots (vanilla decoding's gen length; default 128)")
    ap.add_argument("--block-size", type=positive_int, default=32, help="vanilla decoding's block (default 32)")
    ap.add_argument("--steps", type=positive_int, default=None, help="total forwards (default: --max-new-tokens)")
    ap.add_argument("--batch-size", type=positive_int, default=50)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", required=True, help="output .pt")
    a = ap.parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    from d2f.data.gsm import make_problems
    from d2f.data.tokenizer import encode_problems, load_tokenizer
    from d2f.models import from_pretrained

    tok = load_tokenizer(a.tokenizer)
    model = from_pretrained(a.model, dtype=torch.float32).eval()
    # a prefix of the recipe's data: same generator, same encoding, answers EOS-padded to --max-new-tokens
    data = encode_problems(make_problems("train", a.n, seed=a.seed), tok, a.max_new_tokens,
                           length_flag="--max-new-tokens")
    prompts, refs = [ids[:n] for ids, n in data], [ids[n:] for ids, n in data]
    steps = a.steps or a.max_new_tokens
    t0 = time.time()
    # <out>.partial: the rows recorded so far, after every batch; a stopped run continues from it when it is
    # run again with the same settings (the settings that change the rows or where batches start)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    partial = Path(f"{a.out}.partial")
    settings = {"model": a.model, "n": a.n, "seed": a.seed, "gen": a.max_new_tokens, "block": a.block_size,
                "steps": steps, "batch_size": a.batch_size}
    done = None
    if partial.is_file():
        p = torch.load(partial, map_location="cpu", weights_only=True)
        if p.get("settings") != settings:
            raise ConfigError(f"{str(partial)!r} holds the orders of a stopped run with other settings "
                              f"({p.get('settings')}, now {settings}); run it again with those, or delete the file")
        done = p["orders"]
        print(f"continuing from {partial}: {len(done)} of {a.n} problems recorded")

    def save_partial(rows):
        atomic_save({"settings": settings, "orders": rows.clone()}, partial)
    orders = decode_orders(model, prompts, refs, a.max_new_tokens, a.block_size, steps, a.batch_size, done,
                           save_partial)
    out = {"orders": orders, "references": torch.tensor(refs, dtype=torch.long), "gen_len": a.max_new_tokens,
           "block_size": a.block_size, "steps": steps, "num_problems": a.n, "seed": a.seed, "model": a.model}
    atomic_save(out, Path(a.out))  # a killed run never leaves a half-written file that looks recorded
    partial.unlink(missing_ok=True)
    print(f"{a.n} problems, {time.time() - t0:.0f}s -> {a.out}")
    return out


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


if __name__ == "__main__":
    from d2f.errors import run_main
    raise SystemExit(run_main(main))
