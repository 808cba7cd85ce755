"""Autoregressive decoding with a real KV cache (docs/design.md §3, "AR baseline").

Two model families:
- ours with `config.is_causal` (the testbed AR baseline, `tiny-ar`): `d2f.cache.KVCache`, the
  causal pattern with key padding, per-sample position ids.
- any Hugging Face `AutoModelForCausalLM` (Qwen2.5, Llama...): its own KV cache (`cache` in recent transformers, `past_key_values` in older ones),
  `attention_mask` for the left padding, per-sample position ids.

The first forward runs over the prompt and yields the first token; each later token costs one
forward of one position. A sample stops at its first EOS (its slots after it are EOS); the batch
stops when every sample has stopped. `use_cache=False` recomputes the whole prefix every step
(the slow reference).
"""
from __future__ import annotations

import torch
from torch import Tensor

from d2f.masks import causal
from infer.batch import Batch, answers, cancel, drop_finished, join_at, keep_rows, new_cache, write_back
from infer.sampling import predict
from infer.steps import StepLog, read_rows


def is_hf_model(model) -> bool:
    from d2f.models.config import ModelConfig
    return not isinstance(getattr(model, "config", None), ModelConfig)


def _commit(batch: Batch, pos: int, logits: Tensor, active: Tensor, cfg, eos_id, log: StepLog,
            generator, rows: Tensor | None = None) -> Tensor:
    """Write the next token at buffer index pos from last-row logits (B, V); return new active."""
    tok, _ = predict(logits[:, None], cfg.temperature, generator)
    tok = tok[:, 0]
    fill = eos_id if eos_id is not None else tok
    batch.x[:, pos] = torch.where(active, tok, torch.as_tensor(fill, device=tok.device))
    committed = torch.zeros(batch.x.shape[0], batch.gen_len, dtype=torch.bool, device=tok.device)
    committed[:, pos - batch.prompt_len] = active
    log(batch.answer(), active, committed, None, None, rows)
    return active & (tok != eos_id) if eos_id is not None else active


def decode(model, batch: Batch, cfg, log: StepLog, generator: torch.Generator | None = None,
           use_cache: bool = True, eos_id: int | None = None, compact: bool = True) -> None:
    """Fill batch.x's answer slots in place (ours or HF, chosen by the model's type).
    compact (ours): drop finished samples from the batch and the cache."""
    if is_hf_model(model):
        return decode_hf(model, batch, cfg, log, generator, use_cache, eos_id, compact)
    for finished in steps(model, batch, cfg, log, generator, use_cache, eos_id, compact):
        for i, answer in finished:
            batch.x[i, batch.prompt_len:] = answer


def steps(model, batch: Batch, cfg, log: StepLog, generator: torch.Generator | None = None,
          use_cache: bool = True, eos_id: int | None = None, compact: bool = True,
          gen_lens: list[int] | None = None):
    """Our causal models' decode loop as a generator, one forward (one token per sample) per iteration;
    the protocol of `infer.d2f_decoder.steps`: it yields the samples that stopped at that step as (StepLog
    index, answer) pairs, answer = the sample's `gen_len` slots (EOS after its first EOS), and
    `send(Changes(...))` adds or cancels samples before the next forward.

    All samples write the same buffer index `pos` at each step, so a sample's answer starts where it
    joined: `start` per sample. A joining sample's prompt is placed to end at `pos` (the buffer moves
    right first if the prompt is longer than `pos`), and the next forward starts at its first prompt
    token: the others' rows there are recomputed from the same tokens, which under causal attention
    gives the same keys/values, and the joining sample gets its prompt and first token in one forward,
    as alone."""
    dev = batch.x.device
    B = batch.x.shape[0]
    vocab = model.config.vocab_size
    fill = eos_id if eos_id is not None else 0
    start = torch.full((B,), batch.prompt_len, dtype=torch.long, device=dev)  # (B,) first answer index
    budget = torch.tensor(gen_lens or [batch.gen_len] * B, dtype=torch.long, device=dev)  # (B,)
    active = torch.ones(B, dtype=torch.bool, device=dev)
    ids = torch.arange(B, device=dev)  # each row's StepLog index
    cache = new_cache(model, B, batch.x.shape[1]) if use_cache else None
    pattern = causal(batch.key_valid)
    pos, lo = batch.prompt_len, 0  # pos: the index written this step; [0, lo) is in the cache
    G = int(budget.max())  # the widest budget
    decoding = [True] * B  # the host's copy of `active`, read once per step (read_rows)
    while any(decoding):
        f_lo = lo if use_cache else 0
        logits = model(batch.x[:, f_lo:pos], position_ids=batch.position_ids[:, f_lo:pos], mask=pattern,
                       cache=cache, offset=f_lo)[:, -1, :vocab]  # (B, V)
        tok = predict(logits[:, None], cfg.temperature, generator)[0][:, 0]
        batch.x[:, pos] = torch.where(active, tok, fill)
        answer, committed = None, None
        if log.watched:
            answer = answers(batch, start, G)  # (B, G): each sample's answer so far
            committed = ((start[:, None] + torch.arange(G, device=dev)) == pos) & active[:, None]
        log(answer, active, committed, None, None, ids)
        ended = (pos + 1 - start >= budget) if eos_id is None else (tok == eos_id) | (pos + 1 - start >= budget)
        decoding, stopped, (starts, budgets) = read_rows(active, ended, ids, start, budget)
        out = []
        if stopped:
            answer = answers(batch, start, G) if answer is None else answer
            for r, i in stopped:  # slots after an EOS read as EOS, as in the batch buffer
                a = answer[r, :budgets[r]].clone()
                a[pos + 1 - starts[r]:] = fill
                out.append((i, a))
        active = active & ~ended
        lo, pos = pos, pos + 1
        keep = [r for r, d in enumerate(decoding) if d]
        if compact and keep and len(keep) < len(decoding):
            batch, idx = keep_rows(keep, batch, cache)
            start, budget, active, ids = start[idx], budget[idx], active[idx], ids[idx]
            pattern = causal(batch.key_valid)
            decoding = [True] * len(keep)
        change = yield out
        if change is not None:
            batch, start, budget, active, ids, cache, pos, lo = _apply(change, model, batch, start, budget, active,
                                                                       ids, cache, pos, lo, fill)
            pattern = causal(batch.key_valid)
            G = int(budget.max())
            decoding = read_rows(active, None, ids)[0]


def _apply(change, model, batch: Batch, start, budget, active, ids, cache, pos: int, lo: int, fill: int):
    """Cancel samples, then place the joining ones so their prompts end at `pos`."""
    dev = batch.x.device
    active = cancel(change, ids, active)
    new = change.join
    if new is None or new.x.shape[0] == 0:
        return batch, start, budget, active, ids, cache, pos, lo
    keep = active.nonzero()[:, 0]
    if len(keep) < len(active):
        if cache is not None:
            cache.select(keep)
        batch, start, budget, active, ids = batch.select(keep), start[keep], budget[keep], active[keep], ids[keep]
    gen_lens = change.gen_lens or [new.gen_len] * new.x.shape[0]
    n = new.x.shape[0]
    # causal attention never looks past a sample's own position: nothing to hide beyond its answer
    batch, start, budget, shift = join_at(batch, start, budget, new, gen_lens, pos, fill, hide_beyond=False)
    pos, lo = pos + shift, lo + shift
    if cache is not None:
        cache.widen(shift, batch.x.shape[1], new_rows=n)
    active = torch.cat([active, torch.ones(n, dtype=torch.bool, device=dev)])
    ids = torch.cat([ids, torch.tensor(change.join_ids, dtype=torch.long, device=dev)])
    # the next forward starts at the first joining prompt token (a real one: the padding before it is hidden)
    first = pos - max(new.prompt_lens)
    return batch, start, budget, active, ids, cache, pos, min(lo, first)


def hf_cache_kwarg(model) -> str:
    """The name under which this transformers version passes and returns the KV cache: `cache` in recent
    versions (where `past_key_values` is deprecated, to be removed in 5.40), `past_key_values` in older ones."""
    import inspect
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT wrapper takes **kwargs
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


@torch.no_grad()
def decode_hf(model, batch: Batch, cfg, log: StepLog, generator, use_cache: bool, eos_id: int | None,
              compact: bool = True) -> None:
    P, L = batch.prompt_len, batch.x.shape[1]
    B = batch.x.shape[0]
    attn = batch.key_valid.long() if batch.key_valid is not None else torch.ones_like(batch.x)
    active = torch.ones(B, dtype=torch.bool, device=batch.x.device)
    orig, rows = batch, torch.arange(B, device=batch.x.device)
    past = None
    cache_kw = hf_cache_kwarg(model)
    for pos in range(P, L):
        f_lo = pos - 1 if (use_cache and past is not None) else 0
        out = model(input_ids=batch.x[:, f_lo:pos], attention_mask=attn[:, :pos],
                    position_ids=batch.position_ids[:, f_lo:pos], use_cache=use_cache, **{cache_kw: past})
        past = getattr(out, cache_kw) if use_cache else None
        active = _commit(batch, pos, out.logits[:, -1], active, cfg, eos_id, log, generator, rows)
        if not active.any():
            break
        # drop finished samples where the HF cache can follow (DynamicCache.batch_select_indices)
        if compact and not active.all() and (past is None or hasattr(past, "batch_select_indices")):
            batch, rows, keep = drop_finished(orig, batch, rows, active, None)
            active, attn = active[keep], attn[keep]
            if past is not None:
                past.batch_select_indices(keep)
    write_back(orig, batch, rows)
