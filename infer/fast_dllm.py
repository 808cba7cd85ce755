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

from infer.batch import (Batch, answer_done, answers, block_boundary, block_commits, forward_logits, hold_joins,
                         new_cache)
from infer.sampling import commit_factor, commit_threshold, commit_topk, predict, vanilla_schedule
from infer.steps import StepLog, read_rows


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
    for finished in steps(model, batch, cfg, log, generator, refresh_every_step, compact):
        for i, answer in finished:
            batch.x[i, batch.prompt_len:] = answer


def steps(model, batch: Batch, cfg, log: StepLog, generator: torch.Generator | None = None,
          refresh_every_step: bool = False, compact: bool = True, gen_lens: list[int] | None = None):
    """The decode loop as a generator, with the protocol of `infer.d2f_decoder.steps`: one forward per iteration,
    yielding the samples that stopped at that step as (StepLog index, answer (G,)) pairs; samples sent in
    `Changes.join` start at the next block boundary, aligned with the batch's current block (their
    prompts end where it starts; `infer.batch.join_at`). Every sample has the same budget G (the block
    schedule depends on it). That block's first step is a full forward, which rewrites the whole cache,
    so a joining sample decodes exactly as alone. One loop, longer than most functions here, because the
    decoding state (block, step, joins waiting for the boundary) lives across `yield`s."""
    mask_id, eos_id = model.config.mask_token_id, model.config.eos_token_id
    P, G = batch.prompt_len, batch.gen_len
    B, Bs = batch.x.shape[0], cfg.block_size
    n_blocks = G // Bs
    if gen_lens is not None and set(gen_lens) != {G}:
        raise ValueError(f"fast-dllm decodes one budget per batch (G = {G}), got {sorted(set(gen_lens))}")
    dev = batch.x.device
    pattern = batch.full_pattern()
    cache = None if cfg.cache == "none" else new_cache(model, B, batch.x.shape[1])
    rule = commit_rule(cfg)
    start = torch.full((B,), P, dtype=torch.long, device=dev)  # (B,) where each sample's answer starts
    active = ~answer_done(batch.answer(), mask_id, eos_id)
    ids = torch.arange(B, device=dev)  # each row's StepLog index
    decoding = read_rows(active, None, ids)[0]  # the host's copy of `active`, read once per step after this
    lo = P  # the current block [lo, lo + Bs), the same buffer columns for every sample
    waiting: list = []  # joins sent mid-block, applied at the next block boundary
    while True:
        hi, L = lo + Bs, batch.x.shape[1]
        blk = (lo - start) // Bs  # (B,) each sample's own index of the current block
        schedule = None
        if cfg.rule == "topk":
            schedule = vanilla_schedule((batch.x[:, lo:hi] == mask_id).sum(-1), cfg.total_steps // n_blocks)
        i = 0
        block = batch.x[:, lo:hi]  # (B, Bs) view of the current block
        masked = (block == mask_id) & active[:, None]  # (B, Bs) what this step may commit
        # A sample still decoding has finished every block before this one and not touched this one yet,
        # so the block has masks exactly when somebody decodes.
        more = any(decoding)
        while more:
            if cache is None:
                f_lo, f_hi, c = 0, L, None
            elif i == 0 or refresh_every_step:
                f_lo, f_hi, c = 0, L, cache
            elif cfg.cache == "prefix":
                f_lo, f_hi, c = lo, L, cache
            else:  # dual
                f_lo, f_hi, c = lo, hi, cache
            logits, first = forward_logits(model, batch, f_lo, f_hi, lo, pattern, c)
            tokens, conf = predict(logits[:, lo - first:hi - first], cfg.temperature, generator, mask_id)  # (B, Bs)
            sel = rule(conf, masked, i, schedule) & masked
            block.copy_(torch.where(sel, tokens, block))
            answer = answers(batch, start, G)  # (B, G)
            committed = block_commits(batch, sel, lo, start, G) if log.watched else None
            info = [{"block": b} for b in blk.tolist()] if log.wants_info else None
            log(answer, masked.any(-1), committed, info, (first, f_hi), ids)
            done = answer_done(answer, mask_id, eos_id)
            # the next step's masks: those left in the block of the samples still decoding
            masked = (block == mask_id) & (active & ~done)[:, None]
            decoding, stopped, [left] = read_rows(active, done, ids, masked.any(-1))
            more = any(left)
            out = [(k, answer[r].clone()) for r, k in stopped]
            active = active & ~done
            i += 1
            change = yield out
            if change is not None:
                active, waiting = hold_joins(change, ids, active, waiting)
                masked = (block == mask_id) & active[:, None]
                decoding, _, [left] = read_rows(active, None, ids, masked.any(-1))
                more = any(left)
        # ---- block boundary: leave, join -----------------------------------------------
        joined = bool(waiting)
        batch, decoding, start, active, ids, lo = block_boundary(batch, decoding, waiting, start, active, ids, hi, G,
                                                                 mask_id, cache, compact)
        waiting = []
        if joined and cache is not None:  # the next forward is a full one: it rewrites every row
            cache = new_cache(model, batch.x.shape[0], batch.x.shape[1])
        pattern = batch.full_pattern()
        if not any(decoding):
            return
