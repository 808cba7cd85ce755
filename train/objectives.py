"""The pretraining objectives of train/pretrain.py: how each part of a batch is noised and scored.

Why a module of their own: the recipe, the decoding-order recorder (train/decode_orders.py) and the tests
all use them, and none of those should have to import a training script to get a loss. They are pure
torch (plus `d2f.masks` for attention patterns): no accelerate, no config files, no data loading.

- `llada_sft` (LLaDA's SFT recipe, `forward_process` + `llada_sft_loss`): the prompt is never masked;
  every answer token (EOS padding included, so the model learns where to stop) is replaced by [MASK] with
  probability p = (1 - eps) * t + eps, t ~ U(0, 1) per sample; the loss is the cross-entropy on masked
  tokens weighted 1 / p, divided by the sample's answer length and averaged over the batch. Full attention.
- Optional shares of a llada_sft batch train other states: `clean_prefix_frac` (every answer token from its
  clean prefix, `clean_prefix_layout`), `semi_ar_frac` (the states semi-autoregressive decoding visits,
  `semi_ar_process`), `result_mask_frac` (GSM8K calculator results masked with every later occurrence,
  `result_process`) and `decode_order_frac` (the states the model's own vanilla decoding visits,
  `mean_masked_ce` on train/decode_orders.py's DecodeStates). Each function's docstring says why.
- `causal` (`causal_targets` + `causal_loss`): next-token cross-entropy on the answer tokens up to and
  including the first EOS, for the same-architecture AR baseline.

`compute_loss` splits a batch into these parts. Its random draws (all from the recipe's mask generator,
in a fixed order) are part of what a checkpoint restores, so resumed runs see the same masks.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from d2f import masks
from d2f.models.common import shift_logits

OBJECTIVES = ("llada_sft", "causal")


# ---- LLaDA SFT -----------------------------------------------------------------------------------

def forward_process(input_ids: torch.Tensor, prompt_lens: torch.Tensor, mask_id: int, eps: float,
                    generator: torch.Generator | None = None):
    """LLaDA SFT noising: mask each answer token with probability p = (1-eps) t + eps, t ~ U(0,1) per sample.

    Returns noisy ids (B, L), the boolean mask of replaced positions (B, L) and p (B,).
    """
    B, L = input_ids.shape
    dev = generator.device if generator is not None else input_ids.device
    # drawn on the generator's device (CPU in the recipe), so runs on any device draw the same masks
    t = torch.rand(B, generator=generator, device=dev).to(input_ids.device)
    p = (1 - eps) * t + eps  # (B,)
    answer = torch.arange(L, device=input_ids.device)[None] >= prompt_lens[:, None]  # (B, L)
    u = torch.rand(B, L, generator=generator, device=dev).to(input_ids.device)
    masked = (u < p[:, None]) & answer
    noisy = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    return noisy, masked, p


def llada_sft_loss(logits: torch.Tensor, input_ids: torch.Tensor, masked: torch.Tensor, p: torch.Tensor,
                   prompt_lens: torch.Tensor) -> torch.Tensor:
    """sum over masked tokens of CE / (p * answer_len), divided by the batch size (LLaDA SFT)."""
    B, L = input_ids.shape
    answer_len = (L - prompt_lens).float()  # (B,) answer + EOS padding
    weight = 1.0 / (p[:, None] * answer_len[:, None]).expand(B, L)  # (B, L)
    ce = F.cross_entropy(logits[masked].float(), input_ids[masked], reduction="none")  # (M,)
    return (ce * weight[masked]).sum() / B


# ---- every answer token from its clean prefix ----------------------------------------------------

def clean_prefix_layout(input_ids: torch.Tensor, prompt_lens: torch.Tensor, mask_id: int):
    """Every answer position predicted from its clean prefix, all in one forward (block diffusion's
    two-copy trick with blocks of one token).

    The sequence (B, L) becomes two copies side by side, (B, 2L), with the same position ids: the clean
    sequence, then an all-[MASK] copy. Attention is `d2f.masks.block_causal(prompt_len, 1)` within the
    clean copy (the prompt sees itself, answer token j sees the prompt and answer tokens up to j), and the
    mask-copy query at answer position i sees the clean tokens before i and its own [MASK]. So row i of the
    mask copy equals the last row of a forward over `prompt + answer[:i] + [MASK]` under that pattern,
    and no query ever sees the token it predicts. (Future masks are left out: their states would have to
    be recomputed for every i. Full attention over masks is what the LLaDA SFT part of the batch trains.)

    Why: with uniform masking (LLaDA SFT) a GSM8K result can nearly always be copied from a later
    occurrence (`<<a*b=c>>c`, and c is reused), so a small model learns to copy rather than compute and
    fails when decoding reaches the first occurrence with everything after it masked (the measurement is
    in testbed/teacher/README.md).
    Here every answer token is a computation from a clean prefix, as in next-token training.

    Returns ids (B, 2L), position ids (B, 2L), the attention mask (B, 1, 2L, 2L) and the loss positions
    (B, 2L): the mask copy's answer positions, whose targets are input_ids[:, i].
    """
    B, L = input_ids.shape
    dev = input_ids.device
    i = torch.arange(L, device=dev)
    answer = i[None] >= prompt_lens[:, None]  # (B, L)
    cc = masks.block_causal(prompt_lens, 1).dense(i, i)[:, 0]  # (B, L, L) clean -> clean
    cm = torch.zeros(B, L, L, dtype=torch.bool, device=dev)  # clean -> masks: never
    mc = (i[None, :] < i[:, None])[None] & answer[:, :, None]  # masks -> the clean prefix (answer rows)
    mm = torch.eye(L, dtype=torch.bool, device=dev)[None].expand(B, L, L)  # masks -> their own [MASK]
    attn = torch.cat([torch.cat([cc, cm], 2), torch.cat([mc, mm], 2)], 1)[:, None]  # (B, 1, 2L, 2L)
    ids = torch.cat([input_ids, torch.full_like(input_ids, mask_id)], 1)  # (B, 2L)
    pos = torch.cat([i, i])[None].expand(B, 2 * L)
    loss_at = torch.cat([torch.zeros_like(answer), answer], 1)  # (B, 2L)
    return ids, pos, attn, loss_at


def clean_prefix_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_at: torch.Tensor,
                      prompt_lens: torch.Tensor) -> torch.Tensor:
    """CE at every answer position of the mask copy (all masked: p = 1), divided by the answer length and
    averaged over the batch, the LLaDA SFT normalisation."""
    B, L = input_ids.shape
    at = loss_at[:, L:]  # (B, L) the mask copy's answer positions; its position i predicts input_ids[:, i]
    weight = (1.0 / (L - prompt_lens).float())[:, None].expand(B, L)  # (B, L)
    ce = F.cross_entropy(logits[:, L:][at].float(), input_ids[at], reduction="none")
    return (ce * weight[at]).sum() / B


def first_answer_eos(input_ids: torch.Tensor, prompt_lens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B,) the position of each row's first EOS after its prompt, or the last position if it has none."""
    L = input_ids.shape[1]
    pos = torch.arange(L, device=input_ids.device)[None]  # (1, L)
    is_eos = (input_ids == eos_id) & (pos >= prompt_lens[:, None])
    return torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full_like(prompt_lens, L - 1))


# ---- semi-autoregressive decoding states -----------------------------------------------------------

def semi_ar_process(input_ids: torch.Tensor, prompt_lens: torch.Tensor, mask_id: int, eos_id: int, eps: float,
                    block: int, generator: torch.Generator | None = None):
    """The states semi-autoregressive (block-wise) decoding visits, drawn at random: LLaDA's vanilla
    decoding fills the answer block by block, so the block being decoded is partly masked, every block
    before it is clean and every block after it is all [MASK]. Per sample: a block b of the answer, uniform
    over the blocks that hold content (those that start at or before the answer's first EOS); its tokens
    masked with probability p = (1-eps) t + eps, t ~ U(0, 1); everything after it masked.

    Why: under uniform masking a GSM8K result can nearly always be copied from a later occurrence
    (`<<a*b=c>>c`, and c is reused), so a small model learns to copy rather than compute, and fails when
    decoding reaches the first occurrence with everything after it masked. In these states everything
    after the block is masked, as in decoding. Attention stays full, as LLaDA was trained. A block of EOS
    padding alone is not drawn: once the model has learnt to stop, its loss there is 0 and the forward
    would be wasted (answers are padded to the gen length, so such blocks are common).

    Returns noisy ids (B, L), the loss positions (B, L): the masked slots of block b, and p (B,).
    """
    B, L = input_ids.shape
    dev = generator.device if generator is not None else input_ids.device
    t = torch.rand(B, generator=generator, device=dev).to(input_ids.device)
    p = (1 - eps) * t + eps  # (B,)
    offset = torch.arange(L, device=input_ids.device)[None] - prompt_lens[:, None]  # (B, L) answer offset
    last = first_answer_eos(input_ids, prompt_lens, eos_id) - prompt_lens  # (B,) answer offset of the first EOS
    n_blocks = last // block + 1  # (B,) the blocks that start at or before it
    b = (torch.rand(B, generator=generator, device=dev).to(input_ids.device) * n_blocks).long()  # (B,)
    u = torch.rand(B, L, generator=generator, device=dev).to(input_ids.device)
    start = (b * block)[:, None]
    in_block = (offset >= start) & (offset < start + block)  # (B, L)
    loss_at = in_block & (u < p[:, None])
    masked = loss_at | (offset >= start + block)
    noisy = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    return noisy, loss_at, p


def semi_ar_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_at: torch.Tensor, p: torch.Tensor,
                 block: int) -> torch.Tensor:
    """sum over the block's masked tokens of CE / (p * block), divided by the batch size: LLaDA SFT's
    normalisation with the block in place of the answer."""
    B = input_ids.shape[0]
    weight = (1.0 / (p * block))[:, None].expand_as(loss_at)  # (B, L)
    ce = F.cross_entropy(logits[loss_at].float(), input_ids[loss_at], reduction="none")
    return (ce * weight[loss_at]).sum() / B


# ---- calculator results masked with every later occurrence -------------------------------------------

RESULT_GROUP_PROB = 0.5  # each calculator result (with its later occurrences) is masked with this probability
RESULT_EXTRA_MASK_MAX = 0.2  # other answer tokens are masked with probability p ~ U(0, this)
DIGITS = re.compile(r"[0-9]+")  # a token that continues a number
NUMBER_START = re.compile(r" ?[0-9]+")  # a token that can start one


def number_spans(row: list[int], vocab_text: list[str]) -> list[tuple[int, int, str]]:
    """(start, end, digits) of every number in a row of token ids: a token that is digits (optionally after
    one space) and the bare-digit tokens that follow it."""
    spans, i = [], 0
    while i < len(row):
        if NUMBER_START.fullmatch(vocab_text[row[i]]):
            j = i + 1
            while j < len(row) and DIGITS.fullmatch(vocab_text[row[j]]):
                j += 1
            spans.append((i, j, "".join(vocab_text[t] for t in row[i:j]).strip()))
            i = j
        else:
            i += 1
    return spans


def result_spans(spans: list[tuple[int, int, str]], row: list[int],
                 vocab_text: list[str]) -> list[tuple[int, int, str]]:
    """The calculator results among `number_spans` of `row`: the numbers right after a bare `=` (the c of
    `<<a*b=c>>`)."""
    return [s for s in spans if vocab_text[row[s[0] - 1]] == "="]


def result_process(input_ids: torch.Tensor, prompt_lens: torch.Tensor, mask_id: int, eos_id: int,
                   vocab_text: list[str], generator: torch.Generator | None = None):
    """States in which the model must compute GSM8K calculator results. A result is the number right after
    the bare `=` of a `<<a*b=c>>` annotation; per sample, each result is masked with probability 1/2
    (at least one per sample) together with every later occurrence of its number in the answer (its `>>c`
    copy, its reuse as a later operand, the `#### c` line); every other answer token is masked with
    probability p ~ U(0, 0.2). Full attention; the prompt is never masked.

    Why: with everything before a result visible, a result and its copies masked is exactly what decoding
    faces when it reaches a result, and the only state in which the result must be computed rather than
    copied. Uniform masking makes one with probability ~E[p^2 (1-p)^4] ~ 0.01 per result (the result, its
    copy and every later use masked, its operands not); here about one result per sample is.

    Returns noisy ids (B, L) and the masked positions (B, L), the loss positions.
    """
    B, L = input_ids.shape
    dev = generator.device if generator is not None else input_ids.device
    ends = first_answer_eos(input_ids, prompt_lens, eos_id).tolist()
    masked = torch.zeros(B, L, dtype=torch.bool)
    for r in range(B):
        row, start, end = input_ids[r].tolist(), int(prompt_lens[r]), ends[r]
        spans = [s for s in number_spans(row, vocab_text) if start <= s[0] <= end]
        results = result_spans(spans, row, vocab_text)
        draw = torch.rand(len(results) + 2, generator=generator, device=dev).tolist()  # one per result, 2 more
        chosen = [res for res, u in zip(results, draw) if u < RESULT_GROUP_PROB]
        if not chosen and results:
            chosen = [results[int(draw[-2] * len(results))]]
        for first, _, value in chosen:
            for s, e, v in spans:
                if s >= first and v == value:
                    masked[r, s:e] = True
        u = torch.rand(L, generator=generator, device=dev)
        masked[r, start:end + 1] |= u[start:end + 1] < draw[-1] * RESULT_EXTRA_MASK_MAX
    masked = masked.to(input_ids.device)
    return torch.where(masked, torch.full_like(input_ids, mask_id), input_ids), masked


# ---- the states the model's own vanilla decoding visits (train/decode_orders.py) ------------------

def mean_masked_ce(logits: torch.Tensor, targets: torch.Tensor, loss_at: torch.Tensor) -> torch.Tensor:
    """Mean over samples of the mean CE over the sample's loss positions: for decoding states the slots the
    step chooses among (never empty), for `result_process` the masked slots."""
    ce = torch.zeros(loss_at.shape, dtype=torch.float32, device=logits.device)
    ce[loss_at] = F.cross_entropy(logits[loss_at].float(), targets[loss_at], reduction="none")
    return (ce.sum(-1) / loss_at.sum(-1).clamp_min(1)).mean()


# ---- next-token CE (the AR baseline) -------------------------------------------------------------

def causal_targets(input_ids: torch.Tensor, prompt_lens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Labels for next-token CE: answer tokens up to and including the first EOS, -100 elsewhere."""
    pos = torch.arange(input_ids.shape[1], device=input_ids.device)[None]  # (1, L)
    keep = (pos >= prompt_lens[:, None]) & (pos <= first_answer_eos(input_ids, prompt_lens, eos_id)[:, None])
    return torch.where(keep, input_ids, torch.full_like(input_ids, -100))


def causal_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token CE: logits row i predicts token i+1."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


# ---- one batch -------------------------------------------------------------------------------------

def compute_loss(model, cfg, input_ids: torch.Tensor, prompt_lens: torch.Tensor, generator: torch.Generator,
                 order_batch=None, vocab_text: list[str] | None = None) -> torch.Tensor:
    """The batch's loss under `cfg` (a train/pretrain.py PretrainConfig: objective, mask_eps and the shares).

    llada_sft: the batch is the decoding states `order_batch` (DecodeStates.sample, `cfg.n_decode_states` of
    them) followed by the data samples input_ids (B_data, L): the first `n_prefix` clean-prefix samples,
    then `n_semi` semi-autoregressive ones, then `n_result` calculator-result ones, the rest LLaDA SFT; each
    part is weighted by its share of the batch. The parts draw from `generator` in a fixed order (LLaDA
    SFT, semi-AR, results), which resuming relies on. `vocab_text` (each token id's text) is needed when
    `cfg.result_mask_frac` > 0. causal: next-token CE on the whole batch.
    """
    mcfg = model.config if hasattr(model, "config") else model.module.config
    if cfg.objective == "llada_sft":
        if mcfg.logits_shift:  # Dream: row i-1 predicts token i; every loss below reads row i for token i
            net = model
            model = lambda *a, **k: shift_logits(net(*a, **k))  # noqa: E731
        n_order = 0 if order_batch is None else order_batch[0].shape[0]
        B = input_ids.shape[0] + n_order
        n_prefix = round(B * cfg.clean_prefix_frac)  # the first n data samples, then n_semi, n_result, LLaDA SFT
        n_semi = round(B * cfg.semi_ar_frac)
        n_result = round(B * cfg.result_mask_frac)
        n_before = n_prefix + n_semi + n_result  # data samples before the LLaDA SFT ones
        loss = input_ids.new_zeros((), dtype=torch.float32)
        if n_order > 0:
            x, pos, pattern, loss_at, targets = order_batch
            loss = loss + mean_masked_ce(model(x, pos, mask=pattern), targets, loss_at) * n_order / B
        if n_order + n_before < B:
            ids, plen = input_ids[n_before:], prompt_lens[n_before:]
            noisy, masked, p = forward_process(ids, plen, mcfg.mask_token_id, cfg.mask_eps, generator)
            n_sft = B - n_order - n_before
            loss = loss + llada_sft_loss(model(noisy), ids, masked, p, plen) * n_sft / B
        if n_semi > 0:
            ids, plen = input_ids[n_prefix:n_prefix + n_semi], prompt_lens[n_prefix:n_prefix + n_semi]
            noisy, loss_at, p = semi_ar_process(ids, plen, mcfg.mask_token_id, mcfg.eos_token_id, cfg.mask_eps,
                                                cfg.semi_ar_block, generator)
            loss = loss + semi_ar_loss(model(noisy), ids, loss_at, p, cfg.semi_ar_block) * n_semi / B
        if n_result > 0:
            ids, plen = input_ids[n_prefix + n_semi:n_before], prompt_lens[n_prefix + n_semi:n_before]
            noisy, masked = result_process(ids, plen, mcfg.mask_token_id, mcfg.eos_token_id, vocab_text, generator)
            loss = loss + mean_masked_ce(model(noisy), ids, masked) * n_result / B
        if n_prefix > 0:
            ids, plen = input_ids[:n_prefix], prompt_lens[:n_prefix]
            both, pos, attn, loss_at = clean_prefix_layout(ids, plen, mcfg.mask_token_id)
            loss = loss + clean_prefix_loss(model(both, pos, mask=attn), ids, loss_at, plen) * n_prefix / B
        return loss
    labels = causal_targets(input_ids, prompt_lens, mcfg.eos_token_id)
    return causal_loss(model(input_ids), labels)
