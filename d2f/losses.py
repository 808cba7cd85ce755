"""The D2F asymmetric distillation loss (docs/design.md §5).

The teacher (frozen dLLM, full attention) and the student (same weights + LoRA, block-causal
attention) read the same noisy sequence. At every masked position the student's distribution
is pulled towards the teacher's with a soft cross-entropy, weighted by 1 / (mask ratio of the
token's block) -- the usual masked-diffusion ELBO weight, which keeps lightly-noised blocks
(few masked tokens) from being drowned out by heavily-noised ones:

    loss = (1 / M) * sum_{i masked}  -sum_v softmax(teacher_i)_v * log_softmax(student_i)_v / ratio_i

M is the number of masked tokens in the whole (micro-)batch: the public D2F code
(`D2F-train/utils/loss.py`, `F.cross_entropy(student[masked], softmax(teacher)[masked],
reduction='none') / p_mask[masked]` followed by `.mean()`) averages over all masked tokens of the
batch, not per sample, and we follow it. (One public copy adds an extra entropy term to its
Dream path; it is not part of the D2F method and is not reproduced here.)

Dream's logits are shifted (row i-1 predicts token i); `logits_shift=1` applies
`d2f.models.shift_logits` to both teacher and student before the positions are compared.

EOS padding: the public code meant to drop answer blocks made only of EOS padding from the loss,
but that line is a no-op, so padding blocks are trained on. `padding_blocks` below finds those
tokens; the recipe removes them from `masked` when `loss_on_eos_blocks` is false (default true =
what the public code effectively does; it also teaches the student to keep emitting EOS after
the answer ends, which the decoder relies on to stop).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from d2f.masks import block_index
from d2f.models import shift_logits


def d2f_distill_loss(student_logits: Tensor, teacher_logits: Tensor, masked: Tensor, ratio: Tensor,
                     logits_shift: int = 0, data_targets: Tensor | None = None) -> dict[str, Tensor]:
    """Soft cross-entropy of the student against the teacher at masked positions, / block ratio.

    student_logits, teacher_logits: (B, L, V). masked: (B, L) bool. ratio: (B, L) float, the mask
    ratio of each token's block (> 0 wherever masked). logits_shift: 1 for Dream, 0 for LLaDA.
    data_targets: (B, L) clean token ids to train on instead of the teacher's distribution (plain
    masked-token cross-entropy, the ablation of the distillation); the teacher still gives kl and
    agreement, so both losses are measured against it.

    Returns a dict of named parts; only `loss` carries a gradient:
      loss             the weighted soft cross-entropy averaged over masked tokens
      ce               the same without the 1/ratio weight
      kl               KL(teacher || student) averaged over masked tokens (0 iff they agree)
      teacher_entropy  entropy of the teacher's distribution, averaged over masked tokens
      agreement        fraction of masked tokens where student and teacher argmax agree
      masked_tokens    number of masked tokens M (float)
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    if masked.shape != student_logits.shape[:2] or ratio.shape != masked.shape:
        raise ValueError(f"masked {tuple(masked.shape)} and ratio {tuple(ratio.shape)} must be "
                         f"(B, L) = {tuple(student_logits.shape[:2])}")
    if logits_shift:
        student_logits, teacher_logits = shift_logits(student_logits), shift_logits(teacher_logits)
    n = masked.sum()
    if int(n) == 0:  # nothing to learn from; keep the graph so every rank still runs backward
        zero = student_logits.sum() * 0.0
        z = zero.detach()
        return {"loss": zero, "ce": z, "kl": z, "teacher_entropy": z, "agreement": z,
                "masked_tokens": n.float()}
    s = student_logits[masked].float()  # (M, V)
    with torch.no_grad():
        t_logp = F.log_softmax(teacher_logits[masked].float(), dim=-1)  # (M, V)
        t_p = t_logp.exp()
    s_logp = F.log_softmax(s, dim=-1)
    ce = -(t_p * s_logp).sum(-1)  # (M,) against the teacher
    w = ratio[masked].float()
    if bool((w <= 0).any()):
        raise ValueError("a masked token has mask ratio <= 0; ratios must be > 0 where masked")
    if data_targets is not None:  # after shift_logits row i predicts token i in both families
        trained = -s_logp.gather(-1, data_targets[masked][:, None])[:, 0]  # (M,) against the data
    else:
        trained = ce
    loss = (trained / w).sum() / n
    with torch.no_grad():
        ent = -(t_p * t_logp).sum(-1)
        parts = {
            "ce": trained.mean().detach(),
            "kl": (ce - ent).mean().detach(),
            "teacher_entropy": ent.mean(),
            "agreement": (s.argmax(-1) == t_p.argmax(-1)).float().mean(),
            "masked_tokens": n.float(),
        }
    return {"loss": loss, **parts}


def padding_blocks(clean_ids: Tensor, prompt_len: Tensor | int, block_size: int, eos_id: int) -> Tensor:
    """(B, L) bool: True at tokens of answer blocks whose clean tokens are all `eos_id` (padding)."""
    B, L = clean_ids.shape
    blk = block_index(torch.arange(L, device=clean_ids.device), prompt_len, block_size)  # (B, L) or (L,)
    blk = blk.expand(B, L)
    n_blocks = int(blk.max().item()) + 1
    not_eos = (clean_ids != eos_id).long()
    # count non-EOS tokens per block with a scatter-add, then read each token's block count back
    counts = torch.zeros(B, n_blocks, dtype=torch.long, device=clean_ids.device).scatter_add_(1, blk, not_eos)
    return (torch.gather(counts, 1, blk) == 0) & (blk > 0)
