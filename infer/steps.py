"""Per-step bookkeeping shared by the decoders: NFE per sample, the trace, the on_step hook.

Every decoder calls `log(...)` once per model forward, after it committed that forward's
tokens. A sample is charged one NFE for each forward made while it was still decoding, so a
sample's NFE in a batch equals its NFE alone (a sample that finished early is not charged for
the forwards its neighbours still need).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


class StepLog:
    def __init__(self, batch_size: int, trace: bool = False, on_step: Callable | None = None,
                 sample_ids: list[int] | None = None):
        self.nfe = [0] * batch_size
        self.forwards = 0
        self.records: list[list[dict]] | None = [[] for _ in range(batch_size)] if trace else None
        self.on_step = on_step
        self.sample_ids = sample_ids if sample_ids is not None else list(range(batch_size))

    def __call__(self, answer: Tensor, active: Tensor, committed: Tensor | None = None,
                 info: list[dict] | dict | None = None, forward: tuple[int, int] | None = None,
                 rows: Tensor | None = None) -> None:
        """answer (b, G): the answer buffer after this step's commits; active (b,) bool: samples
        that were decoding during this forward; committed (b, G) bool: positions committed now;
        info: per-sample (list) or shared (dict) extra fields for the trace (block states...);
        forward: the buffer range [lo, hi) this forward covered; rows (b,): which samples of the
        original batch these rows are, when a decoder dropped finished samples (default: all)."""
        self.forwards += 1
        act = active.tolist()
        ids = rows.tolist() if rows is not None else list(range(len(act)))
        for i, a in zip(ids, act):
            self.nfe[i] += int(a)
        if self.records is not None:
            pos = [[] for _ in act] if committed is None else [r.nonzero()[:, 0].tolist() for r in committed]
            for j, (i, a) in enumerate(zip(ids, act)):
                if not a:
                    continue
                rec = {"step": self.nfe[i], "committed": pos[j],
                       "tokens": answer[j, pos[j]].tolist() if pos[j] else []}
                if forward is not None:
                    rec["forward"] = list(forward)
                extra = info[j] if isinstance(info, list) else info
                if extra:
                    rec.update(extra)
                self.records[i].append(rec)
        if self.on_step is not None:
            self.on_step({"step": self.forwards, "sample_ids": [self.sample_ids[i] for i in ids], "answer": answer,
                          "committed": committed, "active": active})


def all_true(batch_size: int, device=None) -> Tensor:
    return torch.ones(batch_size, dtype=torch.bool, device=device)
