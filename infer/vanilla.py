"""LLaDA semi-autoregressive decoding with low-confidence remasking (docs/design.md §3, "Vanilla").

The answer (G slots, all masks) is split into blocks of `block_size`; `steps` forwards are split
evenly over the blocks. At each step one full forward over prompt + whole answer; the current
block's masked positions are ranked by confidence and the top k are committed, k following
LLaDA's precomputed schedule (masked // steps_per_block, remainder on the earliest steps).
NFE = steps exactly: like the published algorithm, it does not stop at EOS.
"""
from __future__ import annotations

import torch

from infer.batch import Batch, forward_logits
from infer.sampling import commit_topk, predict, vanilla_schedule
from infer.steps import StepLog, all_true


def decode(model, batch: Batch, cfg, log: StepLog, generator: torch.Generator | None = None,
           reference: torch.Tensor | None = None) -> None:
    """Fill batch.x's answer slots in place.

    reference: optional (B, G) answer ids; the positions chosen at each step take these tokens instead of
    the model's (train/decode_orders.py records which states decoding visits on a known answer)."""
    mask_id = model.config.mask_token_id
    P, G, L = batch.prompt_len, batch.gen_len, batch.x.shape[1]
    n_blocks = G // cfg.block_size
    steps_per_block = cfg.total_steps // n_blocks
    pattern = batch.full_pattern()
    active = all_true(batch.x.shape[0], batch.x.device)
    for b in range(n_blocks):
        lo, hi = P + b * cfg.block_size, P + (b + 1) * cfg.block_size
        counts = vanilla_schedule((batch.x[:, lo:hi] == mask_id).sum(-1), steps_per_block)  # (B, steps)
        for s in range(steps_per_block):
            logits, start = forward_logits(model, batch, 0, L, lo, pattern)
            tokens, conf = predict(logits[:, lo - start:hi - start], cfg.temperature, generator, mask_id)  # (B, blk)
            if reference is not None:
                tokens = reference[:, lo - P:hi - P]
            block = batch.x[:, lo:hi]
            sel = commit_topk(conf, block == mask_id, counts[:, s])
            batch.x[:, lo:hi] = torch.where(sel, tokens, block)
            committed = torch.zeros(batch.x.shape[0], G, dtype=torch.bool, device=sel.device)
            committed[:, lo - P:hi - P] = sel
            log(batch.answer(), active, committed, {"block": b}, (start, L))
