"""Per-step bookkeeping shared by the decoders: NFE per sample, the trace, the on_step hook.

Every decoder calls `log(...)` once per model forward, after it committed that forward's
tokens. A sample is charged one NFE for each forward made while it was still decoding, so a
sample's NFE in a batch equals its NFE alone (a sample that finished early is not charged for
the forwards its neighbours still need).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

from d2f.errors import UserError

if TYPE_CHECKING:
    from infer.batch import Batch


class DecodeStalled(UserError, RuntimeError):
    """Decoding went on past the forwards its budget can need: the model commits nothing usable."""


@dataclass
class Changes:
    """What a caller of a decoder's `steps` generator sends between two forwards (joins and cancels)."""
    join: Batch | None = None  # new samples, laid out by `make_batch` (answer slots hold the mask id)
    join_ids: list[int] = field(default_factory=list)  # their indices in the StepLog (`StepLog.grow`)
    gen_lens: list[int] | None = None  # their answer budgets in tokens (default: join.gen_len each)
    cancel: list[int] = field(default_factory=list)  # StepLog indices of samples to stop (client gone)


class StepLog:
    def __init__(self, batch_size: int, trace: bool = False, on_step: Callable | None = None,
                 sample_ids: list[int] | None = None, max_forwards: int | None = None, info: bool = False):
        self.batch_size = batch_size
        # A decoder that commits at least one token per forward ends within its budget's forwards; one
        # whose model predicts nothing committable (NaN logits, a mask id that is not the model's) would
        # loop forever, so past this many forwards decoding stops with an error instead.
        self.max_forwards = max_forwards
        self._nfe: Tensor | None = None  # (batch_size,) long, on the decoder's device
        self.forwards = 0
        self.records: list[list[dict]] | None = [[] for _ in range(batch_size)] if trace else None
        self.on_step = on_step
        self.sample_ids = sample_ids if sample_ids is not None else list(range(batch_size))
        self.with_info = info  # on_step events carry the decoder's per-step extras (block states) too

    @property
    def wants_info(self) -> bool:
        """Should the decoder build its per-step extras (a host sync): for the trace or an on_step that asks."""
        return self.records is not None or self.with_info

    @property
    def watched(self) -> bool:
        """Does anything read a step's details (the committed positions): a trace or an on_step hook."""
        return self.records is not None or self.on_step is not None

    @property
    def nfe(self) -> list[int]:
        """Forwards charged to each sample (read once, after decoding: a host sync)."""
        return self._nfe.tolist() if self._nfe is not None else [0] * self.batch_size

    def grow(self, n: int, sample_ids: list | None = None) -> list[int]:
        """Room for n more samples (requests joining a running decode); returns their indices."""
        first = self.batch_size
        self.batch_size += n
        if self._nfe is not None:
            self._nfe = torch.cat([self._nfe, self._nfe.new_zeros(n)])
        if self.records is not None:
            self.records += [[] for _ in range(n)]
        self.sample_ids += sample_ids if sample_ids is not None else list(range(first, first + n))
        return list(range(first, first + n))

    def __call__(self, answer: Tensor | None, active: Tensor, committed: Tensor | None = None,
                 info: list[dict] | dict | None = None, forward: tuple[int, int] | None = None,
                 rows: Tensor | None = None) -> None:
        """answer (b, G): the answer buffer after this step's commits (a decoder may pass None when nothing
        watches the steps, `watched`); active (b,) bool: samples
        that were decoding during this forward; committed (b, G) bool: positions committed now;
        info: per-sample (list) or shared (dict) extra fields for the trace (block states...);
        forward: the buffer range [lo, hi) this forward covered; rows (b,): which samples of the
        original batch these rows are, when a decoder dropped finished samples (default: all).

        Without a trace or an on_step hook nothing here waits for the device: the NFE count
        stays on it, so a decode step costs no host synchronisation for its bookkeeping."""
        self.forwards += 1
        if self.max_forwards is not None and self.forwards > self.max_forwards:
            raise DecodeStalled(f"decoding made no progress: {self.forwards} forwards, more than the {self.max_forwards} "
                                "its budget can need; the model commits nothing usable (NaN logits? a mask_token_id "
                                "that is not the model's mask token?); check the checkpoint, its dtype and its config")
        if self._nfe is None:
            self._nfe = torch.zeros(self.batch_size, dtype=torch.long, device=active.device)
        idx = rows if rows is not None else torch.arange(len(active), device=active.device)
        self._nfe.index_add_(0, idx, active.long())
        if not self.watched:
            return
        act = active.tolist()
        ids = idx.tolist()
        if self.records is not None:
            nfe = self.nfe
            pos = [[] for _ in act] if committed is None else [r.nonzero()[:, 0].tolist() for r in committed]
            for j, (i, a) in enumerate(zip(ids, act)):
                if not a:
                    continue
                rec = {"step": nfe[i], "committed": pos[j],
                       "tokens": answer[j, pos[j]].tolist() if pos[j] else []}
                if forward is not None:
                    rec["forward"] = list(forward)
                extra = info[j] if isinstance(info, list) else info
                if extra:
                    rec.update(extra)
                self.records[i].append(rec)
        if self.on_step is not None:
            self.on_step({"step": self.forwards, "sample_ids": [self.sample_ids[i] for i in ids], "answer": answer,
                          "committed": committed, "active": active, "info": info})


def all_true(batch_size: int, device=None) -> Tensor:
    return torch.ones(batch_size, dtype=torch.bool, device=device)


def read_rows(active: Tensor, done: Tensor | None, ids: Tensor, *more: Tensor) -> tuple[list[bool], list, list]:
    """A decode step's one host synchronisation. Per row: is it still decoding (active and not done), and
    the (row, StepLog index) of each sample that stops now (active and done); `more` ((B,) integer or
    bool tensors) are read in the same transfer and returned as lists."""
    code = torch.where(active, -1, -2) if done is None else torch.where(active, torch.where(done, ids, -1), -2)
    code, *rest = torch.stack([code, *(m.long() for m in more)]).tolist()
    return [c == -1 for c in code], [(i, c) for i, c in enumerate(code) if c >= 0], rest

