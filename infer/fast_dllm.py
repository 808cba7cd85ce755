"""Fast-dLLM decoding (docs/design.md §3, "Fast-dLLM"): block-wise decoding with an approximate KV cache and a
parallel commit rule. Full attention throughout; the cache only changes which rows are forwarded.

Per block, the loop runs until the block has no masks left:
- first step of a block: one full forward over prompt + whole answer. It refreshes the cache
  (cache "prefix"/"dual") *and* serves as the block's first decoding step, so the refresh costs
  no extra NFE.
- later steps: cache "none" forwards everything again; "prefix" forwards x[block_start:] against
  the cached prefix; "dual" forwards only the block and overwrites its cache rows, the suffix's
  rows stay stale until the next block start (the paper's approximation).
Commit rule (current block only): "topk" follows LLaDA's schedule over `steps`; "threshold"
commits every masked position with confidence >= tau and at least the most confident one;
"factor" commits the top n for the largest n with (n + 1)(1 - c_(n)) <= f, at least one.

A sample stops decoding once its answer is final (a committed EOS with no mask before it):
tokens are never remasked, so later blocks cannot change the answer. Its neighbours in the batch
go on; it commits nothing more.
"""
from __future__ import annotations

import torch

from infer.batch import Batch, answer_done, drop_finished, forward_logits, new_cache, write_back
from infer.sampling import commit_factor, commit_threshold, commit_topk, predict, vanilla_schedule
from infer.steps import StepLog


def commit_rule(cfg):
    """(conf, masked, step_in_block, schedule) -> bool commit mask, per cfg.rule."""
    if cfg.rule == "topk":
        return lambda conf, masked, i, schedule: commit_topk(conf, masked, schedule[:, i])
    if cfg.rule == "threshold":
        return lambda conf, masked, i, schedule: commit_threshold(conf, masked, cfg.threshold)
    if cfg.rule == "factor":
        return lambda conf, masked, i, schedule: commit_factor(conf, masked, cfg.factor)
    raise ValueError(f"unknown commit rule {cfg.rule!r}; expected 'topk', 'threshold' or 'factor'")


def decode(model, batch: Batch, cfg, log: StepLog, generator: torch.Generator | None = None,
           refresh_every_step: bool = False, compact: bool = True) -> None:
    """Fill batch.x's answer slots in place. refresh_every_step (tests): every step is a full
    forward that rewrites the whole cache, which must then equal cache "none". compact: at each
    block boundary drop the samples that are done (from the batch and the cache)."""
    mask_id, eos_id = model.config.mask_token_id, model.config.eos_token_id
    P, G, L = batch.prompt_len, batch.gen_len, batch.x.shape[1]
    B, Bs = batch.x.shape[0], cfg.block_size
    n_blocks = G // Bs
    pattern = batch.full_pattern()
    cache = None if cfg.cache == "none" else new_cache(model, B, L)
    rule = commit_rule(cfg)
    active = ~answer_done(batch.answer(), mask_id, eos_id)
    orig, rows = batch, torch.arange(B, device=batch.x.device)  # rows: original index of each row
    for b in range(n_blocks):
        lo, hi = P + b * Bs, P + (b + 1) * Bs
        schedule = None
        if cfg.rule == "topk":
            schedule = vanilla_schedule((batch.x[:, lo:hi] == mask_id).sum(-1), cfg.total_steps // n_blocks)
        i = 0
        while True:
            block = batch.x[:, lo:hi]
            masked = (block == mask_id) & active[:, None]  # (B, Bs)
            decoding = masked.any(-1)
            if not decoding.any():
                break
            if cache is None:
                f_lo, f_hi, c = 0, L, None
            elif i == 0 or refresh_every_step:
                f_lo, f_hi, c = 0, L, cache
            elif cfg.cache == "prefix":
                f_lo, f_hi, c = lo, L, cache
            else:  # dual
                f_lo, f_hi, c = lo, hi, cache
            logits, start = forward_logits(model, batch, f_lo, f_hi, lo, pattern, c)
            tokens, conf = predict(logits[:, lo - start:hi - start], cfg.temperature, generator, mask_id)  # (B, Bs)
            sel = rule(conf, masked, i, schedule) & masked
            batch.x[:, lo:hi] = torch.where(sel, tokens, block)
            committed = torch.zeros(B, G, dtype=torch.bool, device=sel.device)
            committed[:, lo - P:hi - P] = sel
            log(batch.answer(), decoding, committed, {"block": b}, (start, f_hi), rows)
            active = active & ~answer_done(batch.answer(), mask_id, eos_id)
            i += 1
        if not active.any():
            break
        if compact and not active.all():
            batch, rows, keep = drop_finished(orig, batch, rows, active, cache)
            active = active[keep]
            pattern = batch.full_pattern()
            B = len(keep)
    write_back(orig, batch, rows)
