"""Terminal streaming and trace files for `python -m infer.generate`.

Diffusion decoders commit tokens out of order, so the streamer prints the *committed prefix*:
the leading run of answer positions that are already decided, which only ever grows (tokens are
never remasked). With a batch of one this shows the answer appearing as it is decoded.
"""
from __future__ import annotations

import json
import sys
from typing import TextIO

import torch


def committed_text(tokenizer, answer: torch.Tensor, known: torch.Tensor, eos_id: int | None) -> tuple[list[int], str]:
    """An answer's committed prefix, as (token ids, text): answer (G,) ids, known (G,) bool = committed so
    far; the leading run of committed positions, up to (not including) its first EOS (`PrefixStreamer`,
    `infer.engine`)."""
    n = int(known.long().cumprod(0).sum())  # leading decided positions
    tokens = answer[:n].tolist()
    if eos_id is not None and eos_id in tokens:
        tokens = tokens[: tokens.index(eos_id)]
    # a byte-level token may end mid-character: hold back the replacement char until complete
    return tokens, tokenizer.decode(tokens, skip_special_tokens=True).rstrip("\ufffd")


class PrefixStreamer:
    """An `on_step` hook for `infer.api.generate` with batch size 1."""

    def __init__(self, tokenizer, eos_id: int | None, out: TextIO | None = None):
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self._out = out  # None: whatever sys.stdout is when printing
        self.reset()

    @property
    def out(self) -> TextIO:
        return self._out if self._out is not None else sys.stdout

    def reset(self) -> None:
        self.known: torch.Tensor | None = None  # (G,) bool: positions committed so far
        self.printed = ""

    def __call__(self, event: dict) -> None:
        committed = event["committed"]
        if committed is None:
            return
        row = committed[0].cpu()
        self.known = row.clone() if self.known is None else self.known | row
        self.emit(committed_text(self.tokenizer, event["answer"][0], self.known, self.eos_id)[1])

    def emit(self, text: str) -> None:
        """Print what is new; if the text changed behind what was printed (a merge of pieces
        by the tokenizer's decoder), start a fresh line with the whole text."""
        if text.startswith(self.printed):
            self.out.write(text[len(self.printed):])
        else:
            self.out.write("\n" + text)
        self.out.flush()
        self.printed = text

    def finish(self, final_text: str) -> None:
        self.emit(final_text)
        self.out.write("\n")
        self.out.flush()
        self.reset()


def write_trace(fh: TextIO, request: int, prompt: str, result) -> None:
    """One JSON line per step of a request, then a summary line."""
    for step in result.trace or []:
        fh.write(json.dumps({"request": request, **step}) + "\n")
    fh.write(json.dumps({"request": request, "done": True, "prompt": prompt, "text": result.text,
                         "token_ids": result.token_ids, "num_tokens": result.num_tokens, "nfe": result.nfe,
                         "tokens_per_forward": result.tokens_per_forward, "wall_time": result.wall_time,
                         "tokens_per_s": result.tokens_per_s}) + "\n")


class MaskRenderer:
    """An `on_step` hook (batch size 1) printing one line per forward: the answer so far with
    every still-masked position shown as `_`, up to the furthest committed position. Shows how
    D2F decodes several blocks at once."""

    def __init__(self, tokenizer, mask_id: int, out: TextIO | None = None):
        self.tokenizer = tokenizer
        self.mask_id = mask_id
        self._out = out

    def __call__(self, event: dict) -> None:
        row = event["answer"][0].tolist()
        decided = [i for i, t in enumerate(row) if t != self.mask_id]
        end = decided[-1] + 1 if decided else 0
        pieces = ["_" if t == self.mask_id else self.tokenizer.decode([t]) for t in row[:end]]
        out = self._out if self._out is not None else sys.stdout
        out.write(f"[{event['step']:4d}] {''.join(pieces)}\n".replace("\r", " "))
        out.flush()
