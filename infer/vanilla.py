"""LLaDA semi-autoregressive decoding with low-confidence remasking (docs/design.md §3, "Vanilla").

The answer (G slots, all masks) is split into blocks of `block_size`; `steps` forwards are split
evenly over the blocks. At each step one full forward over prompt + whole answer; the current
block's masked positions are ranked by confidence and the top k are committed, k following
LLaDA's precomputed schedule (masked // steps_per_block, remainder on the earliest steps).
NFE = steps exactly: like the published algorithm, it does not stop at EOS.
"""
from __future__ import annotations

import torch

from infer.batch import Batch, answers, block_boundary, block_commits, forward_logits, hold_joins
from infer.sampling import commit_topk, predict, vanilla_schedule
from infer.steps import StepLog, all_true, read_rows


def decode(model, batch: Batch, cfg, log: StepLog, generator: torch.Generator | None = None,
           reference: torch.Tensor | None = None) -> None:
    """Fill batch.x's answer slots in place.

    reference: optional (B, G) answer ids; the positions chosen at each step take these tokens instead of
    the model's (train/decode_orders.py records which states decoding visits on a known answer)."""
    for finished in steps(model, batch, cfg, log, generator, reference=reference):
        for i, answer in finished:
            batch.x[i, batch.prompt_len:] = answer


def steps(model, batch: Batch, cfg, log: StepLog, generator: torch.Generator | None = None,
          reference: torch.Tensor | None = None, gen_lens: list[int] | None = None):
    """The decode loop as a generator, with the protocol of `infer.d2f_decoder.steps` (one forward per iteration,
    yielding the samples finished at that step). Samples sent in `Changes.join` start at the next block
    boundary, aligned with the batch's current block (`infer.batch.join_at`); every sample has the same
    budget G and so the same steps per block. A sample is finished after its last block's last step (NFE =
    steps, as published); its answer has no masks left then, since steps <= max_new_tokens makes every step
    commit at least one token."""
    mask_id = model.config.mask_token_id
    P, G = batch.prompt_len, batch.gen_len
    n_blocks = G // cfg.block_size
    if gen_lens is not None and set(gen_lens) != {G}:
        raise ValueError(f"vanilla decodes one budget per batch (G = {G}), got {sorted(set(gen_lens))}")
    steps_per_block = cfg.total_steps // n_blocks
    dev = batch.x.device
    pattern = batch.full_pattern()
    start = torch.full((batch.x.shape[0],), P, dtype=torch.long, device=dev)  # (B,) where each answer starts
    active = all_true(batch.x.shape[0], dev)
    ids = torch.arange(batch.x.shape[0], device=dev)  # each row's StepLog index
    lo = P  # the current block [lo, lo + block_size), the same buffer columns for every sample
    waiting: list = []
    decoding = [True] * batch.x.shape[0]  # the host's copy of `active`, read once per step (read_rows)
    while any(decoding):
        hi, L = lo + cfg.block_size, batch.x.shape[1]
        counts = vanilla_schedule((batch.x[:, lo:hi] == mask_id).sum(-1), steps_per_block)  # (B, steps)
        for s in range(steps_per_block):
            logits, first = forward_logits(model, batch, 0, L, lo, pattern)
            tokens, conf = predict(logits[:, lo - first:hi - first], cfg.temperature, generator, mask_id)  # (B, blk)
            if reference is not None:  # (its rows are the StepLog indices)
                tokens = reference[ids].gather(1, (lo - start)[:, None] + torch.arange(hi - lo, device=dev))
            block = batch.x[:, lo:hi]
            sel = commit_topk(conf, (block == mask_id) & active[:, None], counts[:, s])
            block.copy_(torch.where(sel, tokens, block))
            answer = answers(batch, start, G)
            committed = block_commits(batch, sel, lo, start, G) if log.watched else None
            info = [{"block": b} for b in ((lo - start) // cfg.block_size).tolist()] if log.wants_info else None
            log(answer, active, committed, info, (first, L), ids)
            # a sample is done after its last block's last step (masks can remain only if the model
            # predicted nothing committable, e.g. every prediction the mask token)
            last = ((lo - start) // cfg.block_size == n_blocks - 1) & (s == steps_per_block - 1)
            done = ~(answer == mask_id).any(-1) | last
            decoding, stopped, _ = read_rows(active, done, ids)
            out = [(k, answer[r].clone()) for r, k in stopped]
            active = active & ~done
            change = yield out
            if change is not None:
                active, waiting = hold_joins(change, ids, active, waiting)
                decoding = read_rows(active, None, ids)[0]
        batch, decoding, start, active, ids, lo = block_boundary(batch, decoding, waiting, start, active, ids, hi, G,
                                                                 mask_id)
        waiting = []
        pattern = batch.full_pattern()
