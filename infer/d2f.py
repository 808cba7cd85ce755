"""D2F pipelined parallel decoding (docs/design.md §3, "D2F pipelined parallel decoding").

The prompt is block 0; answer blocks of `block_size` are appended one at a time to a window of
in-flight blocks, all decoded in parallel under the block-causal pattern, so keys/values of
finished blocks never change and caching them is exact.

Each step:
1. one forward over the window (every block not yet exactly cached) against the cache;
   blocks that were finished before this forward are now written with their final tokens,
   so they leave the window;
2. in every in-flight block commit the masked positions with confidence > tau_conf; a fully
   activated block with none above tau_conf commits its single most confident one;
3. update block states: a block is *finished* when it has no masks and all its predecessors are
   finished; a block becomes *fully activated* when its predecessor is finished (or is the prompt)
   or is decoded to a fraction >= tau_act; if the newest block is decoded to >= tau_add, the
   budget allows and no EOS has been committed, a new all-mask block is added (semi-activated,
   or fully activated at once if its predecessor already qualifies).
A sample is done when its answer is final (no masks up to a committed EOS, or no masks at all).

Batches: the window forwarded is the union of the decoding samples' windows. Rows of a sample
outside its own window are either its finished blocks (recomputed with the same tokens: same
keys/values) or blocks it has not added yet (masks that its in-flight blocks cannot attend to
under block-causal attention), so neither changes its result.

`use_cache=False` is the slow reference: every step recomputes [0, window end) without a cache.
"""
from __future__ import annotations

import torch
from torch import Tensor

from d2f.masks import block_causal
from infer.batch import Batch, answer_done, drop_finished, forward_logits, new_cache, write_back
from infer.sampling import commit_threshold, predict
from infer.steps import StepLog

STATES = ("unadded", "semi", "active", "finished", "cached")


def block_states(added: Tensor, full_act: Tensor, finished: Tensor, cached: Tensor) -> list[list[str]]:
    """Per sample, the state name of each added block (for the trace)."""
    out = []
    for a, f, d, c in zip(added.tolist(), full_act.tolist(), finished.tolist(), cached.tolist()):
        out.append(["cached" if ci else "finished" if di else "active" if fi else "semi"
                    for ai, fi, di, ci in zip(a, f, d, c) if ai])
    return out


def decode(model, batch: Batch, cfg, log: StepLog, generator: torch.Generator | None = None,
           use_cache: bool = True, compact: bool = True) -> None:
    """Fill batch.x's answer slots in place. compact: drop finished samples from the batch (and
    the cache) so later forwards only pay for the samples still decoding."""
    mask_id, eos_id = model.config.mask_token_id, model.config.eos_token_id
    P, G, L = batch.prompt_len, batch.gen_len, batch.x.shape[1]
    B, Bs = batch.x.shape[0], cfg.block_size
    NB = G // Bs
    dev = batch.x.device
    pattern = block_causal(P, Bs, batch.key_valid)
    cache = new_cache(model, B, L) if use_cache else None

    # Block state, (B, NB) bool each. Block 0 (the first answer block) starts added and fully
    # activated: its predecessor is the prompt.
    added = torch.zeros(B, NB, dtype=torch.bool, device=dev)
    full_act = torch.zeros_like(added)
    finished = torch.zeros_like(added)
    added[:, 0] = full_act[:, 0] = True
    # Rows [0, exact_end[i]) of sample i hold exact keys/values in the cache.
    exact_end = torch.zeros(B, dtype=torch.long, device=dev)
    active = ~answer_done(batch.answer(), mask_id, eos_id)
    orig, rows = batch, torch.arange(B, device=dev)  # rows: original index of each row

    while True:
        # ---- 1. forward the union window of the decoding samples --------------------------
        n_added = added.sum(-1)  # (B,)
        # One read of the device's state per step (a host sync): is any sample decoding, and the
        # union window's bounds. Everything else stays on the device.
        decoding, lo, top = torch.stack([active.any().long(), torch.where(active, exact_end, L).min(),
                                         torch.where(active, n_added, 0).max()]).tolist()
        if not decoding:
            break
        lo = lo if use_cache else 0
        hi = P + top * Bs
        logits, start = forward_logits(model, batch, lo, hi, max(lo, P), pattern, cache)
        # Everything finished before this forward has now been written with its final tokens.
        n_fin = finished.long().cumprod(-1).sum(-1)  # (B,) leading finished blocks
        exact_end = torch.where(active, P + n_fin * Bs, exact_end)
        cached = torch.arange(NB, device=dev)[None] < n_fin[:, None]

        # ---- 2. commit in every in-flight block -----------------------------------------
        # Blocks before `first` are finished for every decoding sample: nothing to commit there.
        first = (max(lo, P) - P) // Bs
        nb = (hi - P) // Bs - first  # blocks with predictions
        a_lo = P + first * Bs
        tokens, conf = predict(logits[:, a_lo - start:hi - start], cfg.temperature, generator, mask_id)
        ans = batch.x[:, a_lo:hi]  # (B, nb*Bs)
        blk = slice(first, first + nb)
        in_flight = added[:, blk] & ~finished[:, blk] & active[:, None]  # (B, nb)
        masked = (ans == mask_id).view(B, nb, Bs) & in_flight[..., None]
        sel = commit_threshold(conf.reshape(B * nb, Bs), masked.view(B * nb, Bs), cfg.tau_conf,
                               at_least_one=full_act[:, blk].reshape(-1), strict=True).view(B, nb * Bs)
        batch.x[:, a_lo:hi] = torch.where(sel, tokens, ans)

        # ---- 3. update block states ----------------------------------------------------
        left = (batch.answer() == mask_id).view(B, NB, Bs).sum(-1)  # (B, NB) masks left
        frac = torch.where(added, 1 - left.double() / Bs, torch.zeros_like(left, dtype=torch.float64))
        finished = (added & (left == 0)).long().cumprod(-1).bool()
        # predecessor of block j: the prompt for j = 0 (always finished, fraction 1)
        prev_fin = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=dev), finished[:, :-1]], 1)
        prev_frac = torch.cat([torch.ones(B, 1, dtype=torch.float64, device=dev), frac[:, :-1]], 1)
        ready = prev_fin | (prev_frac >= cfg.tau_act)
        full_act = full_act | (added & ready)
        n_added = added.sum(-1)
        newest = (n_added - 1).clamp_min(0)
        has_eos = (batch.answer() == eos_id).any(-1) if eos_id is not None else torch.zeros_like(active)
        grow = active & (n_added < NB) & ~has_eos & (frac.gather(1, newest[:, None])[:, 0] >= cfg.tau_add)
        new = torch.nn.functional.one_hot(n_added.clamp_max(NB - 1), NB).bool() & grow[:, None]
        added = added | new
        full_act = full_act | (new & ready)

        committed = torch.zeros(B, G, dtype=torch.bool, device=dev)
        committed[:, a_lo - P:hi - P] = sel
        info = None
        if log.records is not None:
            info = [{"blocks": s} for s in block_states(added, full_act, finished, cached)]
        log(batch.answer(), active, committed, info, (start, hi), rows)
        active = active & ~answer_done(batch.answer(), mask_id, eos_id)
        if compact and active.any() and not active.all():
            batch, rows, keep = drop_finished(orig, batch, rows, active, cache)
            pattern = block_causal(P, Bs, batch.key_valid)
            added, full_act, finished, exact_end, active = (t[keep] for t in (added, full_act, finished, exact_end,
                                                                               active))
            B = len(keep)
    write_back(orig, batch, rows)
