"""A batch of prompts laid out in one buffer, and the model calls every decoder shares.

Prompts of different lengths are *left*-padded so every sample's answer starts at the same
buffer index P (= the longest prompt). Padding is hidden from attention by `key_valid`, and
each sample gets its own `position_ids` starting at 0 on its first real token, so a sample
sees exactly what it would see alone (the public Fast-dLLM batch code forgot the padding mask,
which made accuracy depend on batch size).

    buffer index:  0 .. P-1          P .. P+G-1
    sample 0:      pad pad p p p     answer (G positions, mask tokens at the start)
    sample 1:      p p p p p p p     answer
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from d2f.cache import KVCache
from d2f.masks import Pattern, full
from d2f.models.common import shift_logits


@dataclass
class Batch:
    x: Tensor  # (B, L) long: left-padded prompts, then G answer slots
    position_ids: Tensor  # (B, L) long
    key_valid: Tensor | None  # (B, L) bool, False at padding; None when nothing is padded
    prompt_len: int  # P: buffer index of the first answer position (same for every sample)
    prompt_lens: list[int]  # real length of each sample's prompt

    @property
    def gen_len(self) -> int:
        return self.x.shape[1] - self.prompt_len

    def answer(self) -> Tensor:
        return self.x[:, self.prompt_len:]  # (B, G) view

    def full_pattern(self) -> Pattern | None:
        """Full attention with the padding hidden; None (no mask at all) when nothing is padded."""
        return full(self.key_valid) if self.key_valid is not None else None

    def relayout(self, prompt_len: int, gen_len: int, pad_id: int, fill_id: int) -> "Batch":
        """The same samples in a wider buffer: every row moves right by prompt_len - P (the new
        columns on the left are padding) and gen_len - G answer columns holding fill_id are added on
        the right. What a sample sees does not change: padding is hidden from attention and position
        ids move with their tokens. A request joining a running batch (`infer.serve`) uses this."""
        d, e = prompt_len - self.prompt_len, gen_len - self.gen_len
        if d < 0 or e < 0:
            raise ValueError(f"relayout can only widen a batch: P {self.prompt_len} -> {prompt_len}, "
                             f"G {self.gen_len} -> {gen_len}")
        if d == 0 and e == 0:
            return self
        B, L = self.x.shape
        dev = self.x.device
        x = torch.cat([torch.full((B, d), pad_id, dtype=torch.long, device=dev), self.x,
                       torch.full((B, e), fill_id, dtype=torch.long, device=dev)], 1)
        more = self.position_ids[:, -1:] + 1 + torch.arange(e, device=dev)  # (B, e) positions continue
        position_ids = torch.cat([torch.zeros(B, d, dtype=torch.long, device=dev), self.position_ids, more], 1)
        key_valid = self.key_valid
        if d or key_valid is not None:
            kv = key_valid if key_valid is not None else torch.ones(B, L, dtype=torch.bool, device=dev)
            key_valid = torch.cat([torch.zeros(B, d, dtype=torch.bool, device=dev), kv,
                                   torch.ones(B, e, dtype=torch.bool, device=dev)], 1)
        return Batch(x, position_ids, key_valid, prompt_len, list(self.prompt_lens))

    def concat(self, other: "Batch", check_layout: bool = True) -> "Batch":
        """This batch's rows, then other's (same prompt_len and gen_len: `relayout` them first).
        check_layout=False: only the lengths must agree, and prompt_len is this batch's; for a decoder
        that tracks where each sample's answer starts itself (`infer.ar.steps`)."""
        if check_layout and (self.prompt_len, self.gen_len) != (other.prompt_len, other.gen_len):
            raise ValueError("concat needs batches with the same layout; relayout them first")
        if self.x.shape[1] != other.x.shape[1]:
            raise ValueError(f"concat needs buffers of the same length, got {self.x.shape[1]} and {other.x.shape[1]}")
        if self.key_valid is None and other.key_valid is None:
            key_valid = None
        else:
            key_valid = torch.cat([b.key_valid if b.key_valid is not None else torch.ones_like(b.x, dtype=torch.bool)
                                   for b in (self, other)])
        return Batch(torch.cat([self.x, other.x]), torch.cat([self.position_ids, other.position_ids]), key_valid,
                     self.prompt_len, self.prompt_lens + other.prompt_lens)

    def select(self, rows: Tensor) -> "Batch":
        """The samples `rows` only (decoders drop finished samples); same layout, same P."""
        kv = self.key_valid[rows] if self.key_valid is not None else None
        return Batch(self.x[rows], self.position_ids[rows], kv, self.prompt_len,
                     [self.prompt_lens[i] for i in rows.tolist()])


def join_at(batch: Batch, starts: Tensor, lengths: Tensor, new: Batch, new_lengths: list[int], at: int,
            fill_id: int, hide_beyond: bool) -> tuple[Batch, Tensor, Tensor, int]:
    """Add `new`'s samples to a running batch with their answers starting at buffer index `at` (their
    prompts end there), for decoders whose samples all work on the same buffer index at once (AR: the next
    token; vanilla / Fast-dLLM: the current block), so a sample's answer starts where it joined.

    starts, lengths (B,): where each running sample's answer starts and how long it may be; the new
    samples' lengths are new_lengths. The buffer moves right by `shift` when a joining prompt is longer
    than `at`, and grows on the right to hold every answer. hide_beyond: hide each sample's keys past the
    end of its answer (full attention would see them; alone, the sample's buffer ends there).
    Returns (batch, starts, lengths, shift); the caller's `at` becomes at + shift."""
    dev = batch.x.device
    shift = max(0, new.prompt_len - at)
    at += shift
    starts = torch.cat([starts + shift, torch.full((len(new_lengths),), at, dtype=torch.long, device=dev)])
    lengths = torch.cat([lengths, torch.tensor(new_lengths, dtype=torch.long, device=dev)])
    L = max(batch.x.shape[1] + shift, int((starts + lengths).max()))
    old = batch.relayout(batch.prompt_len + shift, L - batch.prompt_len - shift, fill_id, fill_id)
    out = old.concat(new.relayout(at, L - at, fill_id, fill_id), check_layout=False)
    if hide_beyond:
        beyond = torch.arange(L, device=dev)[None] >= (starts + lengths)[:, None]  # (B', L)
        if beyond.any():
            kv = out.key_valid if out.key_valid is not None else torch.ones_like(out.x, dtype=torch.bool)
            out = Batch(out.x, out.position_ids, kv & ~beyond, out.prompt_len, out.prompt_lens)
    return out, starts, lengths, shift


def cancel(change, ids: Tensor, active: Tensor) -> Tensor:
    """`active` without the samples `change.cancel` names (StepLog indices; `ids`: each row's index)."""
    if not change.cancel:
        return active
    return active & ~torch.isin(ids, torch.tensor(change.cancel, device=ids.device))


def hold_joins(change, ids: Tensor, active: Tensor, waiting: list) -> tuple[Tensor, list]:
    """For decoders that take joins at block boundaries (vanilla, Fast-dLLM): cancel now, keep the joins
    of `change` (an `infer.steps.Changes`) for the next boundary."""
    active = cancel(change, ids, active)
    if change.join is not None and change.join.x.shape[0]:
        waiting = waiting + [change]
    return active, waiting


def block_boundary(batch: Batch, decoding: list[bool], waiting: list, start: Tensor, active: Tensor, ids: Tensor,
                   lo: int, G: int, fill_id: int, cache=None, compact: bool = True):
    """For decoders that take joins at block boundaries (vanilla, Fast-dLLM), at the boundary `lo`: drop the rows
    that no longer decode, from the batch and the cache (`compact`), then the waiting samples (`hold_joins`) join
    with their answers starting at `lo`; every sample has the same budget G. `decoding` is the host's copy of
    `active`. Returns (batch, decoding, start, active, ids, lo), `lo` shifted if a join widened the buffer."""
    keep = [r for r, d in enumerate(decoding) if d]
    if compact and len(keep) < len(decoding) and (keep or waiting):
        batch, idx = keep_rows(keep, batch, cache)
        start, active, ids = start[idx], active[idx], ids[idx]
        decoding = [True] * len(keep)
    dev = batch.x.device
    for change in waiting:
        new = change.join
        if (change.gen_lens and set(change.gen_lens) != {G}) or new.gen_len != G:
            raise ValueError(f"this decoder decodes one budget per batch (G = {G}); a joining batch has another")
        n = new.x.shape[0]
        lengths = torch.full((len(start),), G, dtype=torch.long, device=dev)
        batch, start, _, shift = join_at(batch, start, lengths, new, [G] * n, lo, fill_id, hide_beyond=True)
        lo += shift
        active = torch.cat([active, torch.ones(n, dtype=torch.bool, device=dev)])
        ids = torch.cat([ids, torch.tensor(change.join_ids, dtype=torch.long, device=dev)])
        decoding = decoding + [True] * n  # the joined samples decode
    return batch, decoding, start, active, ids, lo


def answers(batch: Batch, starts: Tensor, G: int) -> Tensor:
    """(B, G): each sample's answer slots [start, start + G) (clamped to the buffer)."""
    idx = (starts[:, None] + torch.arange(G, device=starts.device)).clamp_max(batch.x.shape[1] - 1)
    return batch.x.gather(1, idx)


def make_batch(prompts: list[list[int]], gen_len: int, fill_id: int, pad_id: int, device=None) -> Batch:
    """Left-pad prompts (lists of token ids) and append gen_len slots filled with fill_id."""
    P = max(len(p) for p in prompts)
    B, L = len(prompts), P + gen_len
    x = torch.full((B, L), fill_id, dtype=torch.long)
    key_valid = torch.ones(B, L, dtype=torch.bool)
    position_ids = torch.zeros(B, L, dtype=torch.long)
    for i, p in enumerate(prompts):
        pad = P - len(p)
        x[i, :pad] = pad_id
        x[i, pad:P] = torch.tensor(p, dtype=torch.long)
        key_valid[i, :pad] = False
        position_ids[i, pad:] = torch.arange(L - pad)
    padded = bool((~key_valid).any())
    return Batch(x.to(device), position_ids.to(device), key_valid.to(device) if padded else None,
                 P, [len(p) for p in prompts])


def forward_logits(model, batch: Batch, lo: int, hi: int, need_lo: int, pattern: Pattern | None,
                   cache=None) -> tuple[Tensor, int]:
    """One model call over buffer rows [lo, hi), with Dream's logit shift handled.

    Returns (logits, start) where logits[:, i] predicts the token at buffer index start + i and
    is valid for every index >= need_lo. For a shifted model (row i predicts token i + 1) the
    call starts one row earlier when needed, so index need_lo still gets its prediction.
    """
    shift = model.config.logits_shift
    start = min(lo, need_lo - shift)
    if start < 0:
        raise ValueError(f"cannot predict buffer index {need_lo} with a shifted-logits model: it needs index "
                         f"{need_lo - 1} (the prompt must not be empty)")
    logits = model(batch.x[:, start:hi], position_ids=batch.position_ids[:, start:hi], mask=pattern,
                   cache=cache, offset=start)  # (B, hi - start, V)
    if shift:
        logits = shift_logits(logits)
    # LLaDA's head has embedding_size >= vocab_size rows; the extra ones are not tokens.
    return logits[..., :model.config.vocab_size], start


class _RowWindows:
    """A KVCache seen through per-sample windows: sample i's T new rows are written at buffer indices
    starts[i] + [0, T), and attention reads rows [0, S) of every sample (`forward_rows`)."""

    def __init__(self, cache: KVCache, starts: Tensor, width: int, keys: int):
        self.cache, self.keys = cache, keys
        self.idx = (starts[:, None] + torch.arange(width, device=starts.device))[:, None, :, None]  # (B, 1, T, 1)

    def kv_len(self, offset, q_len: int) -> int:
        return self.keys

    def update(self, layer: int, offset, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        idx = self.idx.expand(-1, k.shape[1], -1, k.shape[3])  # (B, H_kv, T, D)
        self.cache.k[layer].scatter_(2, idx, k)
        self.cache.v[layer].scatter_(2, idx, v)
        if layer == len(self.cache.k) - 1:
            self.cache.length = max(self.cache.length, self.keys)
        return self.cache.k[layer][:, :, :self.keys], self.cache.v[layer][:, :, :self.keys]


def forward_rows(model, batch: Batch, starts: Tensor, width: int, pattern: Pattern, cache: KVCache,
                 keys: int | None = None) -> Tensor:
    """One model call where sample i forwards its own window, buffer indices [starts[i], starts[i] + width),
    against the cache, instead of one window shared by the whole batch (`forward_logits`). Samples at
    different stages of decoding (a server's batch) then pay for their own windows, not for the span of
    all of them. Windows must lie inside the buffer. Returns logits (B, width, V) where logits[i, j]
    predicts the token at buffer index starts[i] + j (Dream's shift handled: row j - 1 predicts it, so a
    window must start one index before the first one it needs). keys: max(starts) + width when the caller
    knows it on the host (otherwise it is read from the device: a sync)."""
    idx = starts[:, None] + torch.arange(width, device=starts.device)  # (B, T) buffer indices
    keys = int(starts.max()) + width if keys is None else keys
    mask = pattern.dense(idx, torch.arange(keys, device=starts.device))  # (B, 1, T, S)
    logits = model(batch.x.gather(1, idx), position_ids=batch.position_ids.gather(1, idx), mask=mask,
                   cache=_RowWindows(cache, starts, width, keys), offset=0)  # (B, T, V)
    if model.config.logits_shift:
        logits = shift_logits(logits)
    return logits[..., :model.config.vocab_size]


def to_device(values: list[int], device) -> Tensor:
    """A short list of host ints as a long tensor on `device`. On a GPU through pinned memory, asynchronously: a
    copy from ordinary (pageable) memory would wait for every kernel queued before it."""
    t = torch.tensor(values, dtype=torch.long)
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def answer_done(answer: Tensor, mask_id: int, eos_id: int | None) -> Tensor:
    """(B,) bool: the answer can no longer change up to its first EOS, i.e. it has no masks at all,
    or it has a committed EOS with no mask before it (tokens are never remasked)."""
    return done_from(answer == mask_id, None if eos_id is None else answer == eos_id)


def done_from(masked: Tensor, eos: Tensor | None) -> Tensor:
    """`answer_done` from the answers' mask and EOS positions, (B, G) bool each (eos None: no EOS id)."""
    before = masked.cumsum(-1)  # (B, G) masks up to and including each slot
    done = before[:, -1] == 0
    return done if eos is None else done | (eos & (before == 0)).any(-1)


def cut_at_eos(tokens: list[int], eos_id: int | None) -> list[int]:
    """The answer up to and including its first EOS."""
    if eos_id is not None and eos_id in tokens:
        return tokens[: tokens.index(eos_id) + 1]
    return tokens


def final_tokens(row: list[int], mask_id: int | None, eos_id: int | None, diffusion: bool = True) -> list[int]:
    """A decoded answer row as the user gets it: up to and including the first EOS, without masks
    (in a diffusion answer masks can only remain after the first EOS or when decoding stopped early)."""
    toks = cut_at_eos(row, eos_id)
    if diffusion and mask_id is not None:
        toks = [t for t in toks if t != mask_id]
    return toks


def drop_finished(orig: Batch, batch: Batch, rows: Tensor, active: Tensor, cache) -> tuple[Batch, Tensor, Tensor]:
    """Write the finished rows of `batch` back to `orig` and keep only the active ones, in the batch
    and in the cache, so later forwards pay only for the samples still decoding.

    rows: the original index of each row of `batch`. Returns (batch, rows, keep), where `keep`
    indexes the kept rows (for the decoder's own per-row state)."""
    orig.x[rows[~active]] = batch.x[~active]
    keep = active.nonzero()[:, 0]
    if cache is not None:
        cache.select(keep)
    return batch.select(keep), rows[keep], keep


def keep_rows(keep: list[int], batch: Batch, cache) -> tuple[Batch, Tensor]:
    """Only the rows `keep` (indices the host already holds, so nothing is read from the device) of the
    batch and the cache (None: no cache). Returns the batch and `keep` on the device, for the caller's own
    per-row tensors."""
    idx = to_device(keep, batch.x.device)
    if cache is not None:
        cache.select(idx)
    return batch.select(idx), idx


def block_commits(batch: Batch, sel: Tensor, lo: int, starts: Tensor, G: int) -> Tensor:
    """(B, G) bool in answer coordinates: the commits `sel` (B, hi - lo) made in buffer columns [lo, hi)
    (for the step log; each sample's answer starts at `starts`)."""
    sel_row = torch.zeros_like(batch.x, dtype=torch.bool)  # (B, L)
    sel_row[:, lo:lo + sel.shape[1]] = sel
    return sel_row.gather(1, starts[:, None] + torch.arange(G, device=sel.device))


def write_back(orig: Batch, batch: Batch, rows: Tensor) -> None:
    """At the end of decoding: the rows still in a compacted `batch` go back to their place in `orig`."""
    if batch is not orig:
        orig.x[rows] = batch.x


def new_cache(model, batch: int, length: int) -> KVCache:
    """The KV cache a decoder uses: the model's own when it brings one (`infer.graphs.StaticForward`
    keeps one with static shapes, for CUDA graphs), else a fresh `KVCache` of `length` rows."""
    make = getattr(model, "make_cache", None)
    return make(batch, length) if make is not None else KVCache.for_model(model, batch, length)
