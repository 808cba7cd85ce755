"""The serving engine behind `infer.serve`: one scheduler thread owns the model and decodes every request.

    engine = Engine(model, tokenizer, DecodeConfig(mode="d2f"), max_batch=16)
    req = engine.submit(Request(prompt_ids, cfg, max_tokens=128, emit=callback))

Requests whose decode settings agree (everything but max_new_tokens and seed) share a *lane*, one
running batch. The scheduler loop steps every lane once per turn (one forward each), so lanes take
turns on the model.

- Every decoder of ours batches continuously (`steps` in infer/d2f_decoder.py, ar.py, fast_dllm.py, vanilla.py):
  a request joins the running batch before the next forward (D2F, AR) or at the next block boundary
  (vanilla, Fast-dLLM: the batch works on one block at a time), and leaves as soon as its answer is
  final. D2F and AR samples keep their own budgets; vanilla and Fast-dLLM lanes hold one budget (their
  block schedule depends on it). A request's tokens are those it gets decoded alone (temperature 0).
- Hugging Face AR models batch per wave: the waiting requests with the same settings and budget decode
  together through `infer.api.generate`, and requests arriving meanwhile wait for the next wave.

A request hears about its progress through `emit(event)`, called on the scheduler thread:
    {"type": "delta", "text": str}     new text of the committed left-to-right prefix
    {"type": "view", ...}              per forward, when the request asked for it (the live page)
    {"type": "done", "text", "token_ids", "finish_reason", "usage", "nfe", "wall_time"}
    {"type": "error", "message", "status"}
Diffusion decoders commit tokens out of order; the text streamed is the prefix whose tokens are all
committed, which only grows (tokens are never remasked).
"""
from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.nn.attention import sdpa_kernel

from infer import ar, d2f_decoder, fast_dllm, vanilla
from infer.batch import final_tokens, make_batch
from infer.decode_config import DecodeConfig
from infer.prompts import cut_at_stop
from infer.stream import committed_text
from infer.steps import Changes, DecodeStalled, StepLog


class Overloaded(Exception):
    """More requests than the engine queues (the server answers 429)."""


@dataclass
class Request:
    prompt_ids: list[int]
    cfg: DecodeConfig  # max_new_tokens: the budget decoded (a whole number of blocks)
    max_tokens: int  # the tokens the user asked for (<= cfg.max_new_tokens): the answer is cut there
    emit: Callable[[dict], None]
    stop: list[str] = field(default_factory=list)
    view: bool = False  # emit a "view" event per forward (masks, block states)
    # scheduler state
    cancelled: bool = False
    done: bool = False
    nfe: int = 0
    known: torch.Tensor | None = None  # (G,) bool: answer positions committed so far
    sent: str = ""  # text emitted so far
    t0: float = field(default_factory=time.perf_counter)
    t_first: float | None = None  # when the first text went out

    def cancel(self) -> None:
        """The client went away: the scheduler drops the request's row before the next forward."""
        self.cancelled = True


def lane_key(cfg: DecodeConfig) -> tuple:
    """Requests that may share a batch: the same settings but the budget (D2F: per sample) and seed."""
    skip = {"seed"} | ({"max_new_tokens"} if cfg.mode in ("d2f", "ar") else set())
    return tuple((f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.name not in skip)


class Engine:
    def __init__(self, model, tokenizer, defaults: DecodeConfig, *, max_batch: int = 16, max_queue: int = 256,
                 max_tokens_in_flight: int | None = None, sdpa_kernels=None, windows: str = "rows"):
        from infer.api import special_ids
        self.model, self.tokenizer, self.defaults = model, tokenizer, defaults
        self.mask_id, self.eos_id, self.pad_id = special_ids(model, tokenizer)
        self.max_batch, self.max_queue = max_batch, max_queue
        # prompt + budget tokens of all running requests of a lane (None: only max_batch limits a lane)
        self.max_tokens_in_flight = max_tokens_in_flight
        self.sdpa_kernels = sdpa_kernels
        if windows not in ("rows", "union"):
            raise ValueError(f"windows must be 'rows' or 'union', got {windows!r}")
        # D2F: each request forwards its own window ("rows"), or the batch one window spanning all ("union";
        # slower when requests are at different stages, as they are here: kept as the ablation)
        self.windows = windows
        self.device = next(model.parameters()).device
        self.inbox: queue.Queue[Request] = queue.Queue()
        self.lanes: dict[tuple, Lane] = {}
        self.requests = 0  # queued + running
        self.lock = threading.Lock()
        self.stats = {"requests": 0, "forwards": 0, "tokens": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="d2f-engine", daemon=True)

    # ---- the HTTP side ----------------------------------------------------------------------
    def start(self) -> "Engine":
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self.inbox.put(None)  # wake the loop
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def submit(self, req: Request) -> Request:
        with self.lock:
            if self.requests >= self.max_queue:
                raise Overloaded(f"the server is at its limit of {self.max_queue} concurrent requests; retry later")
            self.requests += 1
        self.inbox.put(req)
        return req

    # ---- the scheduler thread ---------------------------------------------------------------
    def _loop(self) -> None:
        kernels = sdpa_kernel(self.sdpa_kernels) if self.sdpa_kernels else contextlib.nullcontext()
        with torch.no_grad(), kernels:
            while not self._stop.is_set():
                busy = any(lane.busy() for lane in self.lanes.values())
                try:  # wait for a request only when there is nothing to decode
                    req = self.inbox.get(block=not busy)
                except queue.Empty:
                    req = None
                while req is not None:
                    if not self._stop.is_set():
                        key = lane_key(req.cfg)
                        if key not in self.lanes:
                            self.lanes[key] = self.make_lane(req.cfg)
                        self.lanes[key].pending.append(req)
                    try:
                        req = self.inbox.get_nowait()
                    except queue.Empty:
                        req = None
                for key, lane in list(self.lanes.items()):
                    try:
                        lane.step()
                    except Exception as e:  # a bug must not take the server down: fail this lane's requests
                        traceback.print_exc()
                        lane.fail(f"internal error while decoding: {type(e).__name__}: {e}", 500)
                    if not lane.busy():
                        del self.lanes[key]

    def make_lane(self, cfg: DecodeConfig) -> "Lane":
        if cfg.mode == "d2f":
            cached = cfg.cache != "none"
            return StepLane(self, cfg, d2f_decoder.steps, self.mask_id, use_cache=cached,
                            windows=self.windows if cached else "union")
        if cfg.mode == "ar" and not ar.is_hf_model(self.model):
            return StepLane(self, cfg, ar.steps, self.pad_id, eos_id=self.eos_id)
        if cfg.mode in ("vanilla", "fast-dllm"):
            return StepLane(self, cfg, vanilla.steps if cfg.mode == "vanilla" else fast_dllm.steps, self.mask_id)
        return WaveLane(self, cfg)

    def release(self, req: Request) -> None:
        with self.lock:
            self.requests -= 1

    # ---- per-request bookkeeping (scheduler thread) --------------------------------------------
    def send(self, req: Request, event: dict) -> None:
        """Hand an event to the request's client; a client that cannot take it any more is cancelled."""
        try:
            req.emit(event)
        except Exception:
            req.cancelled = True

    def send_text(self, req: Request, text: str) -> None:
        """Stream what `text` adds to what the request was sent (it only ever grows)."""
        if text.startswith(req.sent) and len(text) > len(req.sent):
            if req.t_first is None:
                req.t_first = time.perf_counter()
            self.send(req, {"type": "delta", "text": text[len(req.sent):]})
            req.sent = text

    def on_forward(self, req: Request, answer_row: torch.Tensor, committed_row: torch.Tensor | None,
                   info: dict | None) -> None:
        """One forward of `req`'s row: count it, stream the grown prefix, check stop strings."""
        req.nfe += 1
        if req.done or req.cancelled:
            return
        if committed_row is not None:
            c = committed_row.cpu()
            req.known = c if req.known is None else req.known | c
        toks, text = ([], "") if req.known is None else committed_text(
            self.tokenizer, answer_row[:req.max_tokens], req.known[:req.max_tokens], self.eos_id)
        hit = any(s and s in text for s in req.stop)
        if hit:
            text = cut_at_stop(text, req.stop)
        elif req.stop:  # hold back what could be the start of a stop string
            hold = max(len(s) for s in req.stop) - 1
            text = text[:max(len(req.sent), len(text) - hold)] if hold > 0 else text
        self.send_text(req, text)
        if req.view:
            pieces = [None if t == self.mask_id else self.tokenizer.decode([t])
                      for t in answer_row[:req.cfg.max_new_tokens].tolist()]
            self.send(req, {"type": "view", "step": req.nfe, "pieces": pieces, "blocks": (info or {}).get("blocks"),
                      "block_size": req.cfg.block_size, "elapsed": time.perf_counter() - req.t0})
        if hit:
            self.finish(req, toks, "stop", text=text)

    def finish(self, req: Request, toks: list[int], reason: str | None = None, text: str | None = None) -> None:
        """Send the final answer (token ids cut as `infer.api.generate` cuts them) and close the request."""
        if req.done:
            return
        req.done = True
        toks = toks[:req.max_tokens]
        if text is None:
            text = self.tokenizer.decode(toks, skip_special_tokens=True)
            if req.stop and any(s and s in text for s in req.stop):
                text, reason = cut_at_stop(text, req.stop), "stop"
        if reason is None:
            reason = "stop" if self.eos_id is not None and self.eos_id in toks else "length"
        self.send_text(req, text)
        wall = time.perf_counter() - req.t0
        self.stats["requests"] += 1
        self.stats["tokens"] += len(toks)
        self.send(req, {"type": "done", "text": text, "token_ids": toks, "finish_reason": reason, "nfe": req.nfe,
                  "wall_time": wall, "first_text_s": (req.t_first or time.perf_counter()) - req.t0,
                  "usage": {"prompt_tokens": len(req.prompt_ids), "completion_tokens": len(toks),
                            "total_tokens": len(req.prompt_ids) + len(toks), "nfe": req.nfe}})
        self.release(req)

    def fail(self, req: Request, message: str, status: int) -> None:
        if req.done:
            return
        req.done = True
        self.send(req, {"type": "error", "message": message, "status": status})
        self.release(req)

    def answer_tokens(self, row: list[int], mode: str) -> list[int]:
        return final_tokens(row, self.mask_id, self.eos_id, diffusion=mode != "ar")


def forward_cap(cfg: DecodeConfig) -> int:
    """The forwards a request's budget can need (the decoders' own cap, `infer.api.generate`)."""
    return max(cfg.total_steps, cfg.max_new_tokens) + cfg.max_new_tokens // cfg.block_size + 1


class Lane:
    """Requests that share one running batch."""

    def __init__(self, engine: Engine, cfg: DecodeConfig):
        self.engine, self.cfg = engine, cfg
        self.pending: list[Request] = []

    def busy(self) -> bool:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    def fail(self, message: str, status: int) -> None:
        raise NotImplementedError

    def forwarded(self, event: dict, request_of: Callable[[int], Request | None]) -> list[Request]:
        """Hand one forward's `on_step` event to each request that was decoding in it (`request_of`: its
        StepLog index -> request); returns those requests."""
        info, out = event.get("info"), []
        for j, (i, act) in enumerate(zip(event["sample_ids"], event["active"].tolist())):
            req = request_of(i)
            if req is None or not act:
                continue
            self.engine.on_forward(req, event["answer"][j], None if event["committed"] is None else event["committed"][j],
                                   info[j] if isinstance(info, list) else info)
            out.append(req)
        return out

    def take(self, running: int, in_flight: int) -> list[Request]:
        """Pending requests that fit beside `running` requests holding `in_flight` tokens."""
        out, limit = [], self.engine.max_tokens_in_flight
        for req in list(self.pending):
            if req.cancelled:
                self.pending.remove(req)
                self.engine.fail(req, "cancelled", 499)
                continue
            size = len(req.prompt_ids) + req.cfg.max_new_tokens
            if running + len(out) >= self.engine.max_batch:
                break
            if limit is not None and (running or out) and in_flight + size > limit:
                break
            out.append(req)
            in_flight += size
            self.pending.remove(req)
        return out


class StepLane(Lane):
    """Continuous batching: requests join the running `steps` generator between forwards (it applies a
    join at the next forward or block boundary), and leave it as soon as they are final."""

    def __init__(self, engine: Engine, cfg: DecodeConfig, steps, fill_id: int, **kwargs):
        super().__init__(engine, cfg)
        self.steps, self.fill_id, self.kwargs = steps, fill_id, kwargs
        self.gen = None
        self.log: StepLog | None = None
        self.members: dict[int, Request] = {}  # StepLog index -> request
        self.generator = None

    def busy(self) -> bool:
        return bool(self.pending or self.members)

    def _batch(self, reqs: list[Request]):
        e = self.engine
        G = max(r.cfg.max_new_tokens for r in reqs)
        return make_batch([r.prompt_ids for r in reqs], G, self.fill_id, e.pad_id, e.device)

    def step(self) -> None:
        e = self.engine
        cancel = [i for i, r in self.members.items() if r.cancelled or r.done]
        for i in cancel:  # done early (a stop string) or the client left
            req = self.members.pop(i)
            if not req.done:
                e.fail(req, "cancelled", 499)
        in_flight = sum(len(r.prompt_ids) + r.cfg.max_new_tokens for r in self.members.values())
        new = self.take(len(self.members), in_flight)
        if self.gen is not None and not self.members and not new:
            self.gen.close()
            self.gen = None
            return
        if self.gen is None:
            if not new:
                return
            self.log = StepLog(len(new), on_step=self._on_step, info=any(r.view for r in new))
            self.members = dict(enumerate(new))
            if self.cfg.temperature > 0:
                self.generator = torch.Generator(device=e.device).manual_seed(new[0].cfg.seed)
            self.gen = self.steps(e.model, self._batch(new), self.cfg, self.log, self.generator,
                                  gen_lens=[r.cfg.max_new_tokens for r in new], **self.kwargs)
            finished = next(self.gen)
        else:
            change = Changes(cancel=cancel)
            if new:
                change.join = self._batch(new)
                change.join_ids = self.log.grow(len(new))
                change.gen_lens = [r.cfg.max_new_tokens for r in new]
                self.members.update(zip(change.join_ids, new))
                self.log.with_info = self.log.with_info or any(r.view for r in new)
            try:
                finished = self.gen.send(change)
            except StopIteration:
                self.gen = None
                finished = []
        e.stats["forwards"] += 1
        for i, answer in finished:
            req = self.members.pop(i, None)
            if req is not None:
                e.finish(req, e.answer_tokens(answer[:req.cfg.max_new_tokens].tolist(), self.cfg.mode))

    def _on_step(self, event: dict) -> None:
        e = self.engine
        for req in self.forwarded(event, self.members.get):
            if req.nfe > forward_cap(req.cfg) and not req.done:
                e.fail(req, f"decoding made no progress in {req.nfe} forwards", 500)

    def fail(self, message: str, status: int) -> None:
        for req in list(self.members.values()) + self.pending:
            self.engine.fail(req, message, status)
        self.members, self.pending, self.gen = {}, [], None


class WaveLane(Lane):
    """Batch per wave: the waiting requests decode together through `infer.api.generate`."""

    def __init__(self, engine: Engine, cfg: DecodeConfig):
        super().__init__(engine, cfg)
        self.wave: list[Request] = []

    def busy(self) -> bool:
        return bool(self.pending)

    def step(self) -> None:
        from infer.api import generate
        e = self.engine
        self.wave = self.take(0, 0)
        if not self.wave:
            return
        cfg = dataclasses.replace(self.cfg, seed=self.wave[0].cfg.seed)
        try:
            results = generate(e.model, e.tokenizer, [r.prompt_ids for r in self.wave], cfg, on_step=self._on_step)
        except DecodeStalled as err:
            self.fail(str(err), 500)
            return
        for req, res in zip(self.wave, results):
            req.nfe = res.nfe
            e.finish(req, res.token_ids)
        self.wave = []

    def _on_step(self, event: dict) -> None:
        self.engine.stats["forwards"] += 1
        self.forwarded(event, lambda i: self.wave[i])

    def fail(self, message: str, status: int) -> None:
        for req in self.wave + self.pending:
            self.engine.fail(req, message, status)
        self.wave, self.pending = [], []
