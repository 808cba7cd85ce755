"""The states the student's own D2F decoding visits, for a distillation round on them (a DAgger round:
`data.student_states` / `data.student_state_frac` in train/distill.py).

    python train/student_states.py --model testbed/teacher --adapter runs/d2f_tiny/adapter \\
        --data testbed/student/teacher_answers.jsonl --out runs/d2f_tiny/student_states.pt

Why: distillation trains the student on noised copies of the teacher's answers (`d2f.noise`): every earlier
block partly masked, every later one more so. Decoding shows it other states: its own tokens, committed in
its own order, finished blocks clean, one to three blocks in flight and nothing after them. On those states
the testbed student agreed with the teacher's argmax at 90% of the in-flight masked positions, against 99%
on the training noise. Recording them and distilling on them as well (the teacher still reads each state
with full attention) is one round of DAgger (Ross et al., 2011): the student visits, the teacher labels.
What it measured is in testbed/student/README.md.

For each problem we decode the prompt with the student (the pipelined D2F decoder, `infer/d2f_decoder.py`,
greedy) and keep its answer, the forward at which each answer slot was committed, and which blocks each
forward decoded. The state before forward t of problem i masks the slots committed at forward t or later;
its loss positions are the masked slots of the blocks in flight at that forward, the slots that forward
predicts.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from d2f.errors import positive_int
from d2f.yaml_config import ConfigError
from train.decode_orders import atomic_save, load_recording

KEYS = {"prompts", "answers", "orders", "nfe", "in_flight", "gen_len", "block_size", "tau_add", "tau_act", "tau_conf"}


@torch.no_grad()
def record_states(model, prompts: list[list[int]], cfg, batch_size: int = 50, on_batch=None) -> dict:
    """Decode every prompt with D2F (cfg: a mode-d2f `infer.decode_config.DecodeConfig`) and return the file's
    contents (see `load_student_states`)."""
    from infer.batch import make_batch
    from infer.d2f_decoder import decode
    from infer.steps import StepLog

    gen_len, block_size = cfg.max_new_tokens, cfg.block_size
    mask_id, n_blocks = model.config.mask_token_id, gen_len // block_size
    device = next(model.parameters()).device
    answers, orders, nfe, flights = [], [], [], []
    for s0 in range(0, len(prompts), batch_size):
        batch = make_batch(prompts[s0:s0 + batch_size], gen_len, mask_id, model.config.pad_token_id, device)
        log = StepLog(batch.x.shape[0], trace=True)
        decode(model, batch, cfg, log)
        for i, steps in enumerate(log.records):
            order = torch.full((gen_len,), len(steps), dtype=torch.long)  # never committed: masked in every state
            flight = torch.zeros(len(steps), n_blocks, dtype=torch.bool)
            flight[0, 0] = True  # the first forward decodes block 0 alone (the decoder starts it added)
            for t, rec in enumerate(steps):
                order[rec["committed"]] = t
                if t + 1 < len(steps):  # the blocks the next forward decodes: added, not finished
                    for b, state in enumerate(rec["blocks"]):
                        flight[t + 1, b] = state in ("semi", "active")
            answers.append(batch.x[i, batch.prompt_len:].cpu())
            orders.append(order)
            nfe.append(len(steps))
            flights.append(flight)
        if on_batch is not None:
            on_batch(len(answers))
    T = max(nfe)
    in_flight = torch.zeros(len(prompts), T, n_blocks, dtype=torch.bool)  # (N, T, NB)
    for i, f in enumerate(flights):
        in_flight[i, :len(f)] = f
    return {"prompts": [list(p) for p in prompts], "answers": torch.stack(answers), "orders": torch.stack(orders),
            "nfe": torch.tensor(nfe, dtype=torch.long), "in_flight": in_flight, "gen_len": gen_len,
            "block_size": block_size, "tau_add": cfg.tau_add, "tau_act": cfg.tau_act, "tau_conf": cfg.tau_conf}


def load_student_states(path: str | Path) -> dict:
    """{"prompts" (N lists of ids), "answers" (N, G) the student's tokens (the mask id where it committed
    none), "orders" (N, G) the forward that committed each slot (nfe[i] if none), "nfe" (N,), "in_flight"
    (N, T, G // block_size) the blocks forward t decoded, "gen_len", "block_size", "tau_*"}."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"student states file {str(path)!r} does not exist; write it with `python "
                          f"train/student_states.py --model <teacher> --adapter <student> --data <data> --out {path}`")
    return load_recording(path, "student states", KEYS, "train/student_states.py")


class StudentStates:
    """Samples recorded decoding states for training, laid out as the recipe's sequences: prompt at 0, the
    gen_len answer slots after it, right-padded to `length` (the padding hidden from attention by key_valid).

    Rows whose prompt + answer do not fit `length` are dropped (`dropped` says how many)."""

    def __init__(self, d: dict, mask_id: int, length: int, block_size: int, vocab: int | None = None):
        if d["block_size"] != block_size:
            raise ConfigError(f"the student states were recorded with block size {d['block_size']}, but "
                              f"noise.block_size is {block_size}; record them again with --block-size {block_size}")
        G = d["gen_len"]
        keep = [i for i, p in enumerate(d["prompts"]) if len(p) + G <= length]
        self.dropped = len(d["prompts"]) - len(keep)
        if not keep:
            raise ConfigError(f"no recorded state fits data.max_length={length}: every prompt + {G} answer slots is "
                              "longer; raise data.max_length")
        self.prompts = [d["prompts"][i] for i in keep]
        self.answers, self.orders = d["answers"][keep], d["orders"][keep]  # (N, G)
        self.nfe, self.in_flight = d["nfe"][keep], d["in_flight"][keep]  # (N,), (N, T, NB)
        if vocab is not None:
            top = max(max(max(p) for p in self.prompts), int(self.answers.max()))
            if top >= vocab or min(min(p) for p in self.prompts) < 0:
                raise ConfigError(f"the student states hold token id {top}, not an id of the model's vocabulary "
                                  f"[0, {vocab}): they were recorded with another model")
        self.G, self.block_size, self.length, self.mask_id = G, block_size, length, mask_id

    def __len__(self) -> int:
        return len(self.prompts)

    def sample(self, n: int, generator: torch.Generator):
        """n states: problem i ~ U{0 .. N-1}, forward t ~ U{0 .. nfe[i]-1} ->
        (x (n, L), prompt_len (n,), key_valid (n, L), loss_at (n, L))."""
        idx = torch.randint(len(self), (n,), generator=generator)
        t = (torch.rand(n, generator=generator) * self.nfe[idx]).long()  # (n,) in [0, nfe)
        return self.state(idx, t)

    def state(self, idx: torch.Tensor, t: torch.Tensor):
        G, L = self.G, self.length
        masked = self.orders[idx] >= t[:, None]  # (n, G) not committed before forward t
        flight = self.in_flight[idx, t]  # (n, NB)
        slot_flight = flight.repeat_interleave(self.block_size, dim=1)[:, :G]  # (n, G)
        answer = torch.where(masked, torch.full_like(self.answers[idx], self.mask_id), self.answers[idx])
        n = len(idx)
        x = torch.full((n, L), self.mask_id, dtype=torch.long)
        key_valid = torch.zeros(n, L, dtype=torch.bool)
        loss_at = torch.zeros(n, L, dtype=torch.bool)
        plen = torch.tensor([len(self.prompts[i]) for i in idx.tolist()], dtype=torch.long)
        for j, i in enumerate(idx.tolist()):
            P = int(plen[j])
            x[j, :P] = torch.tensor(self.prompts[i], dtype=torch.long)
            x[j, P:P + G] = answer[j]
            key_valid[j, :P + G] = True
            loss_at[j, P:P + G] = masked[j] & slot_flight[j]
        return x, plen, key_valid, loss_at


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="the teacher (the student's base): a model dir or hub id")
    ap.add_argument("--adapter", required=True, help="the student: a LoRA adapter dir on --model")
    ap.add_argument("--data", required=True, help="the prompts: a .jsonl or hub data set (the distillation data)")
    ap.add_argument("--split", default="train")
    ap.add_argument("--prompt-field", default=None, help="default: 'prompt' or 'question'")
    ap.add_argument("--limit", type=positive_int, default=None, help="only the first N records")
    ap.add_argument("--tokenizer", default=None, help="default: the one of --model")
    ap.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--max-new-tokens", type=positive_int, default=128, help="answer slots (default 128)")
    ap.add_argument("--block-size", type=positive_int, default=16,
                    help="D2F block size (the recipe's noise.block_size; default 16)")
    ap.add_argument("--tau-add", type=float, default=0.7)
    ap.add_argument("--tau-act", type=float, default=0.95)
    ap.add_argument("--tau-conf", type=float, default=0.99)
    ap.add_argument("--batch-size", type=positive_int, default=50)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", required=True, help="output .pt")
    a = ap.parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    from d2f.data.records import read_records, resolve_fields
    from d2f.data.tokenizer import prompt_ids
    from infer.api import load
    from infer.decode_config import DecodeConfig

    # the decode settings are checked where every decoder's are (one clear line each), before anything loads
    cfg = DecodeConfig(mode="d2f", max_new_tokens=a.max_new_tokens, block_size=a.block_size, tau_add=a.tau_add,
                       tau_act=a.tau_act, tau_conf=a.tau_conf)
    records = read_records(a.data, a.split, a.limit)
    pf, _ = resolve_fields(records, a.data, a.prompt_field, None, need_answer=False, set_hint="--{}-field")
    # the student as the engine loads it: the adapter checked against the base, then merged
    model, tok = load(a.model, mode="d2f", adapter=a.adapter, dtype="float32", tokenizer=a.tokenizer)
    if pf == "prompt_ids":
        prompts = [list(r[pf]) for r in records]
    elif tok is None:
        raise ConfigError(f"{a.model!r} ships no tokenizer and the data is text: pass --tokenizer")
    else:
        prompts = [prompt_ids(tok, str(r[pf]), a.chat_template) for r in records]
    t0 = time.time()
    out = record_states(model, prompts, cfg, a.batch_size,
                        on_batch=lambda n: print(f"[student_states] {n}/{len(prompts)} prompts decoded, "
                                                 f"{time.time() - t0:.0f}s", flush=True))
    out.update(model=a.model, adapter=a.adapter, data=a.data)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_save(out, Path(a.out))  # a killed run never leaves a half-written file that looks recorded
    print(f"[student_states] {len(prompts)} problems, {float(out['nfe'].float().mean()):.1f} forwards each, "
          f"{time.time() - t0:.0f}s -> {a.out}")
    return out


if __name__ == "__main__":
    from d2f.errors import run_main
    raise SystemExit(run_main(main))
