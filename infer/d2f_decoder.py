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
from infer.batch import Batch, cancel, done_from, forward_logits, forward_rows, keep_rows, new_cache, to_device
from infer.sampling import commit_threshold, predict
from infer.steps import Changes, StepLog, read_rows

STATES = ("unadded", "semi", "active", "finished", "cached")


def block_states(added: Tensor, full_act: Tensor, finished: Tensor, cached: Tensor) -> list[list[str]]:
    """Per sample, the state name of each added block (for the trace)."""
    out = []
    for a, f, d, c in zip(added.tolist(), full_act.tolist(), finished.tolist(), cached.tolist()):
        out.append(["cached" if ci else "finished" if di else "active" if fi else "semi"
                    for ai, fi, di, ci in zip(a, f, d, c) if ai])
    return out


def max_left(tau: float, Bs: int) -> int:
    """The most masks a block of Bs may have left and still count as `tau` decoded: the largest l with
    1 - l / Bs >= tau, the same float64 arithmetic as the fraction itself (-1: no count qualifies)."""
    return max((n for n in range(Bs + 1) if 1 - n / Bs >= tau), default=-1)


@dataclass
class Rows:
    """Per-sample decoding state, row i = buffer row i. The tensors stay on the device; the host keeps
    what it needs to choose the next window (`exact_end`) and what it read at the last sync (`Seen`)."""
    n_added: Tensor  # (B,) long: answer blocks added to the sample's window (blocks are added in order)
    full_act: Tensor  # (B, NB) bool: block fully activated
    finished: Tensor  # (B, NB) bool: block and every block before it have no masks
    budget: Tensor  # (B,) long: answer blocks the sample may add (its max_new_tokens / block size)
    within: Tensor  # (B, G) bool: answer slot inside the sample's budget
    active: Tensor  # (B,) bool: still decoding
    ids: Tensor  # (B,) long: the sample's index in the StepLog
    exact_end: list[int]  # host: buffer rows [0, exact_end) of the sample hold exact keys/values

    @classmethod
    def start(cls, n_blocks: int, Bs: int, budget: list[int], ids: list[int], device) -> "Rows":
        B = len(budget)
        full_act = torch.zeros(B, n_blocks, dtype=torch.bool, device=device)
        # Block 0 (the first answer block) starts added and fully activated: its predecessor is the prompt.
        full_act[:, 0] = True
        budget = torch.tensor(budget, dtype=torch.long, device=device)
        within = torch.arange(n_blocks * Bs, device=device)[None] < budget[:, None] * Bs
        return cls(torch.ones(B, dtype=torch.long, device=device), full_act, torch.zeros_like(full_act), budget, within,
                   torch.ones(B, dtype=torch.bool, device=device), torch.tensor(ids, dtype=torch.long, device=device),
                   [0] * B)

    @property
    def added(self) -> Tensor:  # (B, NB) bool
        return torch.arange(self.full_act.shape[1], device=self.n_added.device)[None] < self.n_added[:, None]

    def select(self, keep: list[int], idx: Tensor) -> "Rows":  # idx: keep on the device
        return Rows(*(getattr(self, f)[idx] for f in DEVICE_FIELDS), [self.exact_end[i] for i in keep])

    def widen(self, n_blocks: int, Bs: int, shift: int) -> "Rows":
        """Follow `Batch.relayout`: more block columns (not added), rows moved right by `shift`."""
        pad = lambda t, n: torch.nn.functional.pad(t, (0, n - t.shape[1]))  # noqa: E731
        return Rows(self.n_added, pad(self.full_act, n_blocks), pad(self.finished, n_blocks), self.budget,
                    pad(self.within, n_blocks * Bs), self.active, self.ids, [e + shift for e in self.exact_end])

    def concat(self, other: "Rows") -> "Rows":
        return Rows(*(torch.cat([getattr(self, f), getattr(other, f)]) for f in DEVICE_FIELDS),
                    self.exact_end + other.exact_end)


DEVICE_FIELDS = ("n_added", "full_act", "finished", "budget", "within", "active", "ids")


@dataclass
class Seen:
    """What the host read of the device's state at the last sync, one entry per row."""
    decoding: list[bool]  # still decoding
    n_added: list[int]
    n_fin: list[int]  # leading finished blocks: the next forward writes them with their final tokens
    stopped: list[tuple[int, int]]  # (row, StepLog index) of the samples that stopped at this step

    @classmethod
    def fresh(cls, B: int) -> "Seen":  # the state of `Rows.start`, known without reading the device
        return cls([True] * B, [1] * B, [0] * B, [])

    @classmethod
    def read(cls, rows: Rows, done: Tensor | None = None) -> "Seen":
        """The step's one host synchronisation (`read_rows`): which rows still decode, which samples stop
        now, and per row its added blocks and its leading finished blocks."""
        decoding, stopped, (n_added, n_fin) = read_rows(rows.active, done, rows.ids, rows.n_added,
                                                        rows.finished.sum(-1))
        return cls(decoding, n_added, n_fin, stopped)

    def select(self, keep: list[int]) -> "Seen":
        return Seen([self.decoding[i] for i in keep], [self.n_added[i] for i in keep], [self.n_fin[i] for i in keep],
                    [])


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

    Cost per step, for GPUs where each small kernel launch costs as much as the work (docs/design.md §3):
    one host synchronisation (`Seen.read`), and the bookkeeping works on the forwarded window and on
    (B, blocks) tensors in a few dozen kernels; the test suite counts both.

    The loop is longer than most functions here because its state lives across `yield`s; its forward
    (`_predict`) and the block-state update (`_advance_blocks`) are functions of their own."""
    if windows not in ("union", "rows"):
        raise ValueError(f"windows must be 'union' or 'rows', got {windows!r}")
    if windows == "rows" and not use_cache:
        raise ValueError("windows='rows' forwards against the cache; the no-cache reference uses 'union'")
    mask_id, eos_id = model.config.mask_token_id, model.config.eos_token_id
    Bs = cfg.block_size
    left_act, left_add = max_left(cfg.tau_act, Bs), max_left(cfg.tau_add, Bs)
    dev = batch.x.device
    B = batch.x.shape[0]
    rows = Rows.start(batch.gen_len // Bs, Bs, [g // Bs for g in gen_lens or [batch.gen_len] * B], list(range(B)), dev)
    seen = Seen.fresh(B)
    cache = new_cache(model, B, batch.x.shape[1]) if use_cache else None
    pattern = block_causal(batch.prompt_len, Bs, batch.key_valid)
    cols = torch.arange(batch.gen_len, device=dev)  # answer column index

    while True:
        P, G = batch.prompt_len, batch.gen_len
        B, NB = rows.full_act.shape
        # ---- 1. forward the in-flight windows -------------------------------------------------
        decoding = [i for i, d in enumerate(seen.decoding) if d]
        if not decoding:
            return
        lo = min(rows.exact_end[i] for i in decoding) if use_cache else 0
        top = max(seen.n_added[i] for i in decoding)
        tok, conf, a0, span = _predict(model, batch, rows, seen, cache, pattern, cfg, generator, windows, lo, top)
        # Everything finished before this forward has now been written with its final tokens.
        for i in decoding:
            rows.exact_end[i] = P + seen.n_fin[i] * Bs

        # ---- 2. commit in every in-flight block (the window's answer columns [a0, a1), whole blocks) -----
        a1 = a0 + tok.shape[1]
        win = batch.x[:, P + a0:P + a1]  # (B, W) view of the answer
        # in flight: a mask in an added block of a decoding sample (finished blocks have none left)
        masked = (win == mask_id) & (cols[a0:a1] < (rows.n_added * Bs * rows.active)[:, None])  # (B, W)
        nw = (a1 - a0) // Bs
        sel = commit_threshold(conf.reshape(B * nw, Bs), masked.reshape(B * nw, Bs), cfg.tau_conf,
                               at_least_one=rows.full_act[:, a0 // Bs:a1 // Bs].reshape(-1), strict=True).view(B, -1)
        win.copy_(torch.where(sel, tok, win))

        # ---- 3. update block states ----------------------------------------------------
        ans = batch.answer()
        cached = None
        if log.wants_info:  # the block states before this step's update: which blocks the forward wrote
            cached = torch.arange(NB, device=dev)[None] < torch.tensor(seen.n_fin, device=dev)[:, None]
        is_mask, is_eos = _advance_blocks(rows, ans, Bs, left_act, left_add, mask_id, eos_id)
        info = None
        if log.wants_info:
            info = [{"blocks": s} for s in block_states(rows.added, rows.full_act, rows.finished, cached)]
        committed = None
        if log.watched:
            committed = torch.zeros(B, G, dtype=torch.bool, device=dev)
            committed[:, a0:a1] = sel
        log(ans, rows.active, committed, info, span, rows.ids)
        # Done: no mask left inside the budget, or a committed EOS with no mask before it.
        done = done_from(is_mask & rows.within, is_eos)
        seen = Seen.read(rows, done)
        out = [(i, ans[r].clone()) for r, i in seen.stopped]
        rows.active = rows.active & ~done
        keep = [i for i, d in enumerate(seen.decoding) if d]
        if compact and keep and len(keep) < B:
            batch, idx = keep_rows(keep, batch, cache)
            rows, seen = rows.select(keep, idx), seen.select(keep)
            pattern = block_causal(batch.prompt_len, Bs, batch.key_valid)

        change = yield out
        if change is not None:
            batch, rows, cache = _apply(change, model, batch, rows, cache, Bs)
            seen = Seen.read(rows)
            pattern = block_causal(batch.prompt_len, Bs, batch.key_valid)
            cols = torch.arange(batch.gen_len, device=dev)


def _predict(model, batch: Batch, rows: Rows, seen: Seen, cache, pattern, cfg, generator, windows: str, lo: int,
             top: int) -> tuple[Tensor, Tensor, int, tuple | None]:
    """Step 1 of `steps`: forward the in-flight windows and predict every position they cover. Returns
    tokens and confidences (B, W) for the answer columns [a0, a0 + W), whole blocks, then a0, and the span
    forwarded for the step log ("union" windows only). In "rows" windows W = G and a0 = 0, and columns a
    sample's window does not cover keep confidence 0: never committed."""
    P, L, G, Bs = batch.prompt_len, batch.x.shape[1], batch.gen_len, cfg.block_size
    B, dev, mask_id = batch.x.shape[0], batch.x.device, model.config.mask_token_id
    hi = P + top * Bs
    if windows == "union":  # one window for all: the union of the decoding samples' windows
        # lo is an exact end (P + whole blocks) or below P, so the answer columns start on a block boundary
        logits, start = forward_logits(model, batch, lo, hi, max(lo, P), pattern, cache)
        tok, conf = predict(logits[:, max(lo, P) - start:], cfg.temperature, generator, mask_id)
        return tok, conf, max(lo, P) - P, (start, hi)
    # Each sample forwards [its exact end, its window end); a sample that just joined (at the end of the
    # batch), [0, window end): its prompt is not cached yet. Those go in a forward of their own, so their
    # long windows do not widen everybody's. The window bounds come from the host's copy of the state.
    shift = model.config.logits_shift
    n_new = sum(d and e < P for d, e in zip(seen.decoding, rows.exact_end))
    ans = batch.answer()
    tok = torch.cat([ans, ans[:, :1]], 1)  # (B, G + 1): a new tensor, the batch is written only by the commit
    conf = torch.zeros(B, G + 1, dtype=torch.float64, device=dev)
    for a, b in [(0, B)] if n_new in (0, B) else [(0, B - n_new), (B - n_new, B)]:
        starts = [e - shift if e >= P else 0 for e in rows.exact_end[a:b]]
        ends = [P + n * Bs for n in seen.n_added[a:b]]
        width = max((e - s for s, e, d in zip(starts, ends, seen.decoding[a:b]) if d), default=0)
        if width == 0:  # nobody decoding in this part (cancelled)
            continue
        starts = [min(s if d else 0, L - width) for s, d in zip(starts, seen.decoding[a:b])]
        keys = max(starts) + width
        starts = to_device(starts, dev)
        sub = Batch(batch.x[a:b], batch.position_ids[a:b],
                    None if batch.key_valid is None else batch.key_valid[a:b], P, batch.prompt_lens[a:b])
        view = cache.rows(a, b)
        logits = forward_rows(model, sub, starts, width, block_causal(P, Bs, sub.key_valid), view, keys)
        cache.length = max(cache.length, view.length)
        idx = starts[:, None] + torch.arange(width, device=dev) - P  # (b-a, width) answer index
        col = torch.where((idx >= 0) & (idx < G), idx, G)  # out-of-answer predictions: a spare column
        t, c = predict(logits, cfg.temperature, generator, mask_id)
        tok[a:b].scatter_(1, col, t)
        conf[a:b].scatter_(1, col, c)
    return tok[:, :G], conf[:, :G], 0, None


def _advance_blocks(rows: Rows, ans: Tensor, Bs: int, left_act: int, left_add: int, mask_id: int,
                    eos_id: int | None) -> tuple[Tensor, Tensor | None]:
    """Step 3 of `steps`, D2F's block states after a commit (ans: the answers, (B, G)): a block is finished
    when it and every block before it have no mask left; a block becomes fully active once its predecessor
    is finished or at least tau_act decoded (at most `left_act` masks left); a new block is added behind the
    newest one once that one is tau_add decoded, until the budget or an EOS. Returns the answers' mask and
    EOS positions, (B, G) bool each (None without an EOS id), for the caller's done check."""
    B, NB = rows.full_act.shape
    is_mask = ans == mask_id  # (B, G)
    left = is_mask.view(B, NB, Bs).sum(-1)  # (B, NB) masks left; a block not added yet is all masks
    finished = left.cumsum(-1) == 0
    # predecessor of block j: the prompt for j = 0 (always finished)
    ok = finished | (left <= left_act)
    ready = torch.cat([ok.new_ones(B, 1), ok[:, :-1]], 1)
    grow = rows.active & (left.gather(1, rows.n_added[:, None] - 1)[:, 0] <= left_add)
    is_eos = None
    if eos_id is not None:
        is_eos = ans == eos_id
        grow = grow & ~is_eos.any(-1)
    n_added = rows.n_added + (grow & (rows.n_added < rows.budget))
    rows.n_added, rows.finished = n_added, finished
    rows.full_act = rows.full_act | (rows.added & ready)
    return is_mask, is_eos


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
    keep = rows.active.nonzero()[:, 0].tolist()
    if len(keep) == 0:  # nobody is decoding: start afresh, in the joining samples' own layout
        fresh = Rows.start(new.gen_len // Bs, Bs, [g // Bs for g in gen_lens], change.join_ids, dev)
        return new, fresh, new_cache(model, new.x.shape[0], new.x.shape[1]) if cache is not None else None
    if len(keep) < len(rows.exact_end):
        batch, idx = keep_rows(keep, batch, cache)
        rows = rows.select(keep, idx)
    P, G = max(batch.prompt_len, new.prompt_len), max(batch.gen_len, new.gen_len)
    shift = P - batch.prompt_len
    mask_id = model.config.mask_token_id
    # The padding's token does not matter (it is hidden from attention); the new answer slots are masks.
    old, new = batch.relayout(P, G, mask_id, mask_id), new.relayout(P, G, mask_id, mask_id)
    if cache is not None:
        cache.widen(shift, P + G, new_rows=new.x.shape[0])
    joined = Rows.start(G // Bs, Bs, [g // Bs for g in gen_lens], change.join_ids, dev)
    return old.concat(new), rows.widen(G // Bs, Bs, shift).concat(joined), cache
