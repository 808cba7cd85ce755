"""Autoregressive decoding with a real KV cache (docs/design.md §3, "AR baseline").

Two model families:
- ours with `config.is_causal` (the testbed AR baseline, `tiny-ar`): `d2f.cache.KVCache`, the
  causal pattern with key padding, per-sample position ids.
- any Hugging Face `AutoModelForCausalLM` (Qwen2.5, Llama...): its own `past_key_values`,
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
from infer.batch import Batch, drop_finished, new_cache, write_back
from infer.sampling import predict
from infer.steps import StepLog


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
    P, L = batch.prompt_len, batch.x.shape[1]
    B = batch.x.shape[0]
    vocab = model.config.vocab_size
    pattern = causal(batch.key_valid)
    cache = new_cache(model, B, L) if use_cache else None
    active = torch.ones(B, dtype=torch.bool, device=batch.x.device)
    orig, rows = batch, torch.arange(B, device=batch.x.device)  # rows: original index of each row
    lo = 0  # first row not yet in the cache
    for pos in range(P, L):
        f_lo = lo if use_cache else 0
        logits = model(batch.x[:, f_lo:pos], position_ids=batch.position_ids[:, f_lo:pos], mask=pattern,
                       cache=cache, offset=f_lo)[:, -1, :vocab]  # (B, V)
        active = _commit(batch, pos, logits, active, cfg, eos_id, log, generator, rows)
        lo = pos
        if not active.any():
            break
        if compact and not active.all():
            batch, rows, keep = drop_finished(orig, batch, rows, active, cache)
            active = active[keep]
            pattern = causal(batch.key_valid)
    write_back(orig, batch, rows)


@torch.no_grad()
def decode_hf(model, batch: Batch, cfg, log: StepLog, generator, use_cache: bool, eos_id: int | None,
              compact: bool = True) -> None:
    P, L = batch.prompt_len, batch.x.shape[1]
    B = batch.x.shape[0]
    attn = batch.key_valid.long() if batch.key_valid is not None else torch.ones_like(batch.x)
    active = torch.ones(B, dtype=torch.bool, device=batch.x.device)
    orig, rows = batch, torch.arange(B, device=batch.x.device)
    past = None
    for pos in range(P, L):
        f_lo = pos - 1 if (use_cache and past is not None) else 0
        out = model(input_ids=batch.x[:, f_lo:pos], attention_mask=attn[:, :pos],
                    position_ids=batch.position_ids[:, f_lo:pos], past_key_values=past, use_cache=use_cache)
        past = out.past_key_values if use_cache else None
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
