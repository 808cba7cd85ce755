"""The D2F forward (noising) process: per-block mask ratios that grow along the answer.

    noised = add_block_noise(ids, prompt_len, block_size, mask_id, generator)
    noised.noisy_ids, noised.masked, noised.ratio      # each (B, L)

Sequence layout (docs/design.md §5): sample b is `prompt (prompt_len[b] tokens) + answer`, the answer
cut into blocks of `block_size` starting at index prompt_len[b] (the last block may be partial).
The prompt is never masked. Each sample draws one mask ratio per answer block and every token
of block k is masked independently with probability p_k.

Schedules
- "monotone" (D2F): non-decreasing ratios from the first block to the last, so later blocks are
  always at least as noisy as earlier ones -- the situation the pipelined decoder meets, where
  block k+1 starts while block k is still partly masked. We follow the public D2F code rather
  than the paper: p_0 ~ U[p_min, p_max) with (p_min, p_max) = (0.2, 0.7), and each later block
  adds an increment ~ U[0, (p_max - p_0) / (N - 1)), so the ratios stay below p_max = 0.7. (The
  paper states a minimum ratio of 0.3; the public code draws from 0.2.) N is the largest
  number of answer blocks in the batch, as in the public code: a sample with a longer prompt
  uses the first ratios of its row.
- "random" (ablation): every block draws its own ratio ~ U[p_min, p_max), no ordering.

Randomness comes only from the `torch.Generator` passed in, so a (seed, step) pair reproduces
a batch's noise exactly (exact resume depends on this).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from d2f.masks import block_index

SCHEDULES = ("monotone", "random")


@dataclass
class Noised:
    noisy_ids: Tensor  # (B, L) long: input with masked tokens replaced by mask_id
    masked: Tensor  # (B, L) bool: True where a token was replaced (never in the prompt)
    ratio: Tensor  # (B, L) float: the mask ratio of the token's block (0 in the prompt)


def num_answer_blocks(seq_len: int, prompt_len: Tensor, block_size: int) -> Tensor:
    """Number of (possibly partial) answer blocks per sample: ceil((L - P_b) / B). (B,) long."""
    return torch.div(seq_len - prompt_len + block_size - 1, block_size, rounding_mode="floor").clamp(min=0)


def block_ratios(batch: int, num_blocks: int, generator: torch.Generator, schedule: str = "monotone",
                 p_min: float = 0.2, p_max: float = 0.7) -> Tensor:
    """Mask ratio per (sample, answer block): (batch, num_blocks) float32 on the generator's device."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {schedule!r}; expected one of {SCHEDULES}")
    if not 0.0 < p_min <= p_max <= 1.0:
        raise ValueError(f"noise ratios need 0 < p_min <= p_max <= 1, got p_min={p_min}, p_max={p_max}")
    dev = generator.device
    if num_blocks <= 0:
        return torch.zeros(batch, 0, device=dev)
    if schedule == "random":
        return p_min + (p_max - p_min) * torch.rand(batch, num_blocks, generator=generator, device=dev)
    p0 = p_min + (p_max - p_min) * torch.rand(batch, 1, generator=generator, device=dev)  # (B, 1)
    if num_blocks == 1:
        return p0
    step = (p_max - p0) / (num_blocks - 1)  # (B, 1): the largest increment that keeps p <= p_max
    inc = torch.rand(batch, num_blocks - 1, generator=generator, device=dev) * step  # (B, N-1)
    ratios = torch.cat([p0, p0 + inc.cumsum(dim=1)], dim=1)  # (B, N), non-decreasing
    return ratios.clamp(max=p_max)  # cumsum rounding could overshoot by an ulp


def add_block_noise(input_ids: Tensor, prompt_len: Tensor | int, block_size: int, mask_id: int,
                    generator: torch.Generator, schedule: str = "monotone", p_min: float = 0.2,
                    p_max: float = 0.7) -> Noised:
    """Mask the answer of each sample block by block (see the module docstring).

    input_ids: (B, L) clean sequences. prompt_len: int or (B,) -- index where answer block 0
    starts in each row. The generator may live on the CPU while input_ids are on a GPU.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be > 0, got {block_size}")
    B, L = input_ids.shape
    device = input_ids.device
    if not isinstance(prompt_len, Tensor):
        prompt_len = torch.full((B,), int(prompt_len), dtype=torch.long)
    prompt_len = prompt_len.to(device=device, dtype=torch.long)
    n_blocks = int(num_answer_blocks(L, prompt_len, block_size).max().item()) if B else 0
    ratios = block_ratios(B, n_blocks, generator, schedule, p_min, p_max).to(device)  # (B, N)
    # Per-token ratio: block_index is 0 in the prompt and k+1 in answer block k, so prepend a
    # zero column and gather.
    blk = block_index(torch.arange(L, device=device), prompt_len, block_size)  # (B, L)
    table = torch.cat([torch.zeros(B, 1, device=device), ratios], dim=1)  # (B, N+1)
    ratio = torch.gather(table, 1, blk)  # (B, L)
    u = torch.rand(B, L, generator=generator, device=generator.device).to(device)
    masked = (u < ratio) & (blk > 0)
    noisy = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    return Noised(noisy_ids=noisy, masked=masked, ratio=ratio)
