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

Serving: `steps` is the loop as a generator, one forward per iteration, and samples can join it
between forwards (`send(Changes(...))`, used by `infer.serve`). A joining sample's first forward
starts at its buffer index 0, like a sample's first forward in `decode`. With the union window
(`windows="union"`) the window then starts at 0 for everybody: the others' finished blocks are
forwarded once more with their final tokens, which writes the same keys/values. With per-sample windows
(`windows="rows"`, the server's) the joining samples forward apart. Each sample may have its own answer
budget (`gen_lens`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from d2f.masks import block_causal
from infer.batch import Batch, answer_done, cancel, forward_logits, forward_rows, new_cache
from infer.sampling import commit_threshold, predict
from infer.steps import Changes, StepLog

STATES = ("unadded", "semi", "active", "finished", "cached")


def block_states(added: Tensor, full_act: Tensor, finished: Tensor, cached: Tensor) -> list[list[str]]:
    """Per sample, the state name of each added block (for the trace)."""
    out = []
    for a, f, d, c in zip(added.tolist(), full_act.tolist(), finished.tolist(), cached.tolist()):
        out.append(["cached" if ci else "finished" if di else "active" if fi else "semi"
                    for ai, fi, di, ci in zip(a, f, d, c) if ai])
    return out


@dataclass
class Rows:
    """Per-sample decoding state of the samples in the buffer, row i = buffer row i."""
    added: Tensor  # (B, NB) bool: block added to the sample's window
    full_act: Tensor  # (B, NB) bool: block fully activated
    finished: Tensor  # (B, NB) bool: block and every block before it have no masks
    exact_end: Tensor  # (B,) long: buffer rows [0, exact_end) of the sample hold exact keys/values
    budget: Tensor  # (B,) long: answer blocks the sample may add (its max_new_tokens / block size)
    active: Tensor  # (B,) bool: still decoding
    ids: Tensor  # (B,) long: the sample's index in the StepLog

    @classmethod
    def start(cls, n_blocks: int, budget: list[int], ids: list[int], device) -> "Rows":
        B = len(budget)
        added = torch.zeros(B, n_blocks, dtype=torch.bool, device=device)
        # Block 0 (the first answer block) starts added and fully activated: its predecessor is the prompt.
        added[:, 0] = True
        return cls(added, added.clone(), torch.zeros_like(added), torch.zeros(B, dtype=torch.long, device=device),
                   torch.tensor(budget, dtype=torch.long, device=device),
                   torch.ones(B, dtype=torch.bool, device=device), torch.tensor(ids, dtype=torch.long, device=device))

    def select(self, keep: Tensor) -> "Rows":
        return Rows(*(getattr(self, f)[keep] for f in self.__dataclass_fields__))

    def widen(self, n_blocks: int, shift: int) -> "Rows":
        """Follow `Batch.relayout`: more block columns (not added), rows moved right by `shift`."""
        pad = lambda t: torch.nn.functional.pad(t, (0, n_blocks - t.shape[1]))  # noqa: E731
        return Rows(pad(self.added), pad(self.full_act), pad(self.finished), self.exact_end + shift, self.budget,
                    self.active, self.ids)

    def concat(self, other: "Rows") -> "Rows":
        return Rows(*(torch.cat([getattr(self, f), getattr(other, f)]) for f in self.__dataclass_fields__))


def decode(model, batch: Batch, cfg, log: StepLog, generator: torch.Generator | None = None,
           use_cache: bool = True, compact: bool = True, windows: str = "union") -> None:
    """Fill batch.x's answer slots in place. compact: drop finished samples from the batch (and
    the cache) so later forwards only pay for the samples still decoding. windows: see `steps`."""
    for finished in steps(model, batch, cfg, log, generator, use_cache, compact, windows=windows):
        for i, answer in finished:
            batch.x[i, batch.prompt_len:] = answer


def steps(model, batch: Batch, cfg, log: StepLog, generator: torch.Generator | None = None,
          use_cache: bool = True, compact: bool = True, gen_lens: list[int] | None = None, windows: str = "union"):
    """The decode loop as a generator: one forward per iteration. Each iteration yields the samples that
    stopped decoding at that step as (StepLog index, answer (G,)) pairs; the batch's samples have
    indices 0..B-1, and every sample is yielded once. `send(Changes(...))` adds or cancels samples
    before the next forward. gen_lens: each sample's answer budget in tokens (default: all of G).

    windows: "union" forwards one window for the batch, the union of the samples' windows (any
    attention backend, static shapes); "rows" forwards each sample's own window (`forward_rows`: SDPA
    with a per-sample mask), which is what pays when samples are at different stages, as in a server's
    batch. Both compute the same thing; `use_cache=False` needs "union".

    The loop is longer than most functions here because its state lives across `yield`s; its forward
    (`_predict`) and the block-state update (`_advance_blocks`) are functions of their own."""
    if windows not in ("union", "rows"):
        raise ValueError(f"windows must be 'union' or 'rows', got {windows!r}")
    if windows == "rows" and not use_cache:
        raise ValueError("windows='rows' forwards against the cache; the no-cache reference uses 'union'")
    mask_id, eos_id = model.config.mask_token_id, model.config.eos_token_id
    Bs = cfg.block_size
    dev = batch.x.device
    B = batch.x.shape[0]
    rows = Rows.start(batch.gen_len // Bs, [g // Bs for g in gen_lens or [batch.gen_len] * B], list(range(B)), dev)
    cache = new_cache(model, B, batch.x.shape[1]) if use_cache else None
    pattern = block_causal(batch.prompt_len, Bs, batch.key_valid)

    while True:
        P, L, G = batch.prompt_len, batch.x.shape[1], batch.gen_len
        B, NB = rows.added.shape
        added, full_act, finished, active = rows.added, rows.full_act, rows.finished, rows.active
        # ---- 1. forward the in-flight windows -------------------------------------------------
        n_added = added.sum(-1)  # (B,)
        # One read of the device's state per step (a host sync): is any sample decoding, and the
        # window bounds. Everything else stays on the device.
        decoding, lo, top, n_new = torch.stack([active.any().long(), torch.where(active, rows.exact_end, L).min(),
                                                torch.where(active, n_added, 0).max(),
                                                (active & (rows.exact_end < P)).sum()]).tolist()
        if not decoding:
            return
        lo = lo if use_cache else 0
        tok_full, conf_full, span = _predict(model, batch, rows, cache, pattern, cfg, generator, windows, lo, top, n_new)
        # Everything finished before this forward has now been written with its final tokens.
        n_fin = finished.long().cumprod(-1).sum(-1)  # (B,) leading finished blocks
        rows.exact_end = torch.where(active, P + n_fin * Bs, rows.exact_end)
        cached = torch.arange(NB, device=dev)[None] < n_fin[:, None]

        # ---- 2. commit in every in-flight block -----------------------------------------
        ans = batch.answer()  # (B, G)
        in_flight = added & ~finished & active[:, None]  # (B, NB)
        masked = (ans == mask_id).reshape(B, NB, Bs) & in_flight[..., None]
        sel = commit_threshold(conf_full.reshape(B * NB, Bs), masked.reshape(B * NB, Bs), cfg.tau_conf,
                               at_least_one=full_act.reshape(-1), strict=True).view(B, G)
        batch.x[:, P:] = torch.where(sel, tok_full, ans)

        # ---- 3. update block states ----------------------------------------------------
        _advance_blocks(rows, batch.answer(), cfg, mask_id, eos_id)
        added, full_act, finished = rows.added, rows.full_act, rows.finished

        committed = sel
        info = None
        if log.wants_info:
            info = [{"blocks": s} for s in block_states(added, full_act, finished, cached)]
        log(batch.answer(), active, committed, info, span, rows.ids)
        # Answer slots past a sample's budget are not part of its answer: read them as committed.
        beyond = torch.arange(batch.gen_len, device=dev)[None] >= rows.budget[:, None] * Bs
        done = answer_done(batch.answer().masked_fill(beyond, -1), mask_id, eos_id)
        stopped = (active & done).nonzero()[:, 0]
        out = list(zip(rows.ids[stopped].tolist(), batch.answer()[stopped]))
        rows.active = active & ~done
        if compact and rows.active.any() and not rows.active.all():
            batch, rows = _keep(batch, rows, cache, rows.active.nonzero()[:, 0])
            pattern = block_causal(batch.prompt_len, Bs, batch.key_valid)

        change = yield out
        if change is not None:
            batch, rows, cache = _apply(change, model, batch, rows, cache, Bs)
            pattern = block_causal(batch.prompt_len, Bs, batch.key_valid)


def _predict(model, batch: Batch, rows: Rows, cache, pattern, cfg, generator, windows: str, lo: int, top: int,
             n_new: int) -> tuple[Tensor, Tensor, tuple | None]:
    """Step 1 of `steps`: forward the in-flight windows and predict every position they cover.
    Returns tokens and confidences in answer coordinates, (B, G) each (columns no window covers keep
    confidence 0: never in flight), and the span forwarded for the step log ("union" windows only)."""
    P, L, G, Bs = batch.prompt_len, batch.x.shape[1], batch.gen_len, cfg.block_size
    B, dev, mask_id = batch.x.shape[0], batch.x.device, model.config.mask_token_id
    active = rows.active
    hi = P + top * Bs
    parts = []  # (rows a..b, their answer indices (b-a, T), tokens, confidences)
    if windows == "rows":
        # Each sample forwards [its exact end, its window end); a sample that just joined (at the end of
        # the batch), [0, window end): its prompt is not cached yet. Those go in a forward of their own,
        # so their long windows do not widen everybody's.
        shift = model.config.logits_shift
        hi_row = P + rows.added.sum(-1) * Bs  # (B,) end of each sample's window
        for a, b in [(0, B)] if n_new in (0, B) else [(0, B - n_new), (B - n_new, B)]:
            end, act = rows.exact_end[a:b], active[a:b]
            starts = torch.where(end >= P, end - shift, 0)
            width = int(torch.where(act, hi_row[a:b] - starts, 0).max())
            if width == 0:  # nobody decoding in this part (cancelled)
                continue
            starts = torch.where(act, starts, 0).clamp_max(L - width)
            sub = Batch(batch.x[a:b], batch.position_ids[a:b],
                        None if batch.key_valid is None else batch.key_valid[a:b], P, batch.prompt_lens[a:b])
            view = cache.rows(a, b)
            logits = forward_rows(model, sub, starts, width, block_causal(P, Bs, sub.key_valid), view)
            cache.length = max(cache.length, view.length)
            idx = starts[:, None] + torch.arange(width, device=dev) - P  # (b-a, width) answer index
            parts.append((a, b, idx, *predict(logits, cfg.temperature, generator, mask_id)))
        span = None
    else:  # one window for all: the union of the decoding samples' windows
        logits, start = forward_logits(model, batch, lo, hi, max(lo, P), pattern, cache)
        logits = logits[:, max(lo, P) - start:]  # predictions for [max(lo, P), hi)
        idx = (torch.arange(hi - max(lo, P), device=dev) + max(lo, P) - P).expand(B, -1)
        parts.append((0, B, idx, *predict(logits, cfg.temperature, generator, mask_id)))
        span = (start, hi)
    # into answer coordinates, (B, G); columns no window covers keep confidence 0 (never in flight)
    ans = batch.answer()
    tok_full = torch.cat([ans, ans[:, :1]], 1)  # a new tensor: the batch is written only by the commit
    conf_full = torch.zeros(B, G + 1, dtype=torch.float64, device=dev)
    for a, b, idx, tokens, conf in parts:
        col = torch.where((idx >= 0) & (idx < G), idx, G)  # out-of-answer predictions: a spare column
        tok_full[a:b].scatter_(1, col, tokens)
        conf_full[a:b].scatter_(1, col, conf)
    return tok_full[:, :G], conf_full[:, :G], span


def _advance_blocks(rows: Rows, ans: Tensor, cfg, mask_id: int, eos_id: int | None) -> None:
    """Step 3 of `steps`, D2F's block states after a commit (ans: the answers, (B, G)): a block is finished
    when it and every block before it have no mask left; a block becomes fully active once its predecessor
    is finished or at least tau_act decoded; a new block is added behind the newest one once that one is
    tau_add decoded, until the budget or an EOS."""
    B, NB = rows.added.shape
    Bs, dev, active = cfg.block_size, ans.device, rows.active
    added, full_act = rows.added, rows.full_act
    left = (ans == mask_id).view(B, NB, Bs).sum(-1)  # (B, NB) masks left
    frac = torch.where(added, 1 - left.double() / Bs, torch.zeros_like(left, dtype=torch.float64))
    finished = (added & (left == 0)).long().cumprod(-1).bool()
    # predecessor of block j: the prompt for j = 0 (always finished, fraction 1)
    prev_fin = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=dev), finished[:, :-1]], 1)
    prev_frac = torch.cat([torch.ones(B, 1, dtype=torch.float64, device=dev), frac[:, :-1]], 1)
    ready = prev_fin | (prev_frac >= cfg.tau_act)
    full_act = full_act | (added & ready)
    n_added = added.sum(-1)
    newest = (n_added - 1).clamp_min(0)
    has_eos = (ans == eos_id).any(-1) if eos_id is not None else torch.zeros_like(active)
    grow = (active & (n_added < rows.budget) & ~has_eos
            & (frac.gather(1, newest[:, None])[:, 0] >= cfg.tau_add))
    new = torch.nn.functional.one_hot(n_added.clamp_max(NB - 1), NB).bool() & grow[:, None]
    added = added | new
    full_act = full_act | (new & ready)
    rows.added, rows.full_act, rows.finished = added, full_act, finished


def _keep(batch: Batch, rows: Rows, cache, keep: Tensor) -> tuple[Batch, Rows]:
    """Only the samples `keep`, in the batch, its state and the cache."""
    if cache is not None:
        cache.select(keep)
    return batch.select(keep), rows.select(keep)


def _apply(change: Changes, model, batch: Batch, rows: Rows, cache, Bs: int) -> tuple[Batch, Rows, object]:
    """Cancel samples, then add the joining ones in a layout wide enough for everybody."""
    rows.active = cancel(change, rows.ids, rows.active)
    new = change.join
    if new is None or new.x.shape[0] == 0:
        return batch, rows, cache
    if len(change.join_ids) != new.x.shape[0]:
        raise ValueError(f"Changes.join has {new.x.shape[0]} samples but {len(change.join_ids)} join_ids")
    dev = batch.x.device
    gen_lens = change.gen_lens or [new.gen_len] * new.x.shape[0]
    keep = rows.active.nonzero()[:, 0]
    if len(keep) == 0:  # nobody is decoding: start afresh, in the joining samples' own layout
        fresh = Rows.start(new.gen_len // Bs, [g // Bs for g in gen_lens], change.join_ids, dev)
        return new, fresh, new_cache(model, new.x.shape[0], new.x.shape[1]) if cache is not None else None
    if len(keep) < len(rows.active):
        batch, rows = _keep(batch, rows, cache, keep)
    P, G = max(batch.prompt_len, new.prompt_len), max(batch.gen_len, new.gen_len)
    shift = P - batch.prompt_len
    mask_id = model.config.mask_token_id
    # The padding's token does not matter (it is hidden from attention); the new answer slots are masks.
    old, new = batch.relayout(P, G, mask_id, mask_id), new.relayout(P, G, mask_id, mask_id)
    if cache is not None:
        cache.widen(shift, P + G, new_rows=new.x.shape[0])
    joined = Rows.start(G // Bs, [g // Bs for g in gen_lens], change.join_ids, dev)
    return old.concat(new), rows.widen(G // Bs, shift).concat(joined), cache
