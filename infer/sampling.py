"""Token choice, confidence and the commit rules shared by every decoder (docs/design.md §3, "The shared contract").

Confidences are float64: 0.9 vs 0.9000001 decides which tokens are committed, and the testbed
models put many positions within 1e-9 of 1, where a float32 probability would tie. They are
computed without a float64 copy of the logits (126k columns for LLaDA): the top token's
probability is 1 / (1 + r) with r = sum over the other tokens of exp(logit - top logit), a sum of
small positive terms that float32 holds to ~1e-7 relative, and only r (one number per position)
becomes float64. Sampling at temperature > 0 stays float64 throughout (its Gumbel noise needs it).

- `predict(logits, temperature, generator)`: the token each position would take and its
  confidence (softmax probability of that token). temperature 0 = argmax; temperature > 0 =
  Gumbel-max in float64 (LLaDA's `add_gumbel_noise`, written as argmax(logits / T + G)).
- Commit rules: given confidences (B, T) and a bool `masked` (B, T), return a bool (B, T) of
  positions to commit. Positions that are not masked are never chosen.
"""
from __future__ import annotations

import torch
from torch import Tensor

NEG_INF = float("-inf")


def predict(logits: Tensor, temperature: float = 0.0, generator: torch.Generator | None = None,
            exclude: int | None = None) -> tuple[Tensor, Tensor]:
    """logits (B, T, V) -> (tokens (B, T) long, confidence (B, T) float64).

    exclude: a token id never to predict (the mask token: committing a mask would undo a
    commit, and on an untrained model could keep a block from ever finishing).
    """
    # float64 to sample (the Gumbel noise needs it); else float32, or float64 for float64 models (tests)
    x = logits.double() if temperature > 0 or logits.dtype == torch.float64 else logits.float()
    if exclude is not None:
        if x is logits:  # the caller's own tensor: never written to
            x = x.clone()
        x.select(-1, exclude).fill_(NEG_INF)  # one fill: nothing to copy to the device
    if temperature > 0:
        # the generator lives on the logits' device (see infer.api.generate)
        u = torch.rand(x.shape, dtype=torch.float64, generator=generator, device=x.device)
        gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
        tokens = (x / temperature + gumbel).argmax(-1)
        conf = torch.softmax(x, dim=-1).gather(-1, tokens[..., None])[..., 0]
        return tokens, conf
    tokens = x.argmax(-1)  # (B, T)
    top = x.gather(-1, tokens[..., None])  # (B, T, 1)
    rest = torch.exp(x - top).scatter_(-1, tokens[..., None], 0.0).sum(-1)  # (B, T) other tokens' mass / top's
    return tokens, (rest.double() + 1.0).reciprocal()  # 1 / (1 + r), the same float64 division


def masked_conf(conf: Tensor, masked: Tensor) -> Tensor:
    """Confidence with -inf where the position is not masked (so it is never picked)."""
    return conf.masked_fill(~masked, NEG_INF)


def commit_topk(conf: Tensor, masked: Tensor, k: Tensor | int) -> Tensor:
    """Commit the k most confident masked positions of each row (k (B,) or int; capped at #masked)."""
    B, T = conf.shape
    k = torch.as_tensor(k, device=conf.device).expand(B)
    k = torch.minimum(k, masked.sum(-1))
    order = masked_conf(conf, masked).argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(T, device=conf.device).expand(B, T))
    return (rank < k[:, None]) & masked


def commit_threshold(conf: Tensor, masked: Tensor, tau: float, at_least_one: Tensor | bool = True,
                     strict: bool = False) -> Tensor:
    """Commit every masked position with conf >= tau (> tau if strict); where `at_least_one`
    (bool or (B,)), also the single most confident masked position when none passes."""
    c = masked_conf(conf, masked)  # -inf where not masked: never passes a tau in [0, 1]
    sel = (c > tau) if strict else (c >= tau)
    # The most confident masked position (the first of ties). When anything passes it is one of those
    # that pass (confidences are never NaN for finite logits), so adding it changes nothing.
    best = c.argmax(-1, keepdim=True)  # (B, 1)
    need = masked.any(-1, keepdim=True)
    if at_least_one is not True:
        need = need & torch.as_tensor(at_least_one, device=conf.device).view(-1, 1)
    return sel | torch.zeros_like(sel).scatter_(1, best, need)


def commit_factor(conf: Tensor, masked: Tensor, factor: float) -> Tensor:
    """Fast-dLLM factor rule: sort desc c_(1) >= c_(2) >= ...; commit the top n for the largest n
    with (n + 1) * (1 - c_(n)) <= factor; at least one where anything is masked."""
    c = masked_conf(conf, masked)
    sorted_c, _ = c.sort(dim=-1, descending=True)
    n = torch.arange(1, c.shape[-1] + 1, device=c.device, dtype=torch.float64)
    ok = ((n + 1) * (1 - sorted_c) <= factor) & torch.isfinite(sorted_c)
    # (n+1)(1-c_(n)) grows with n (c_(n) falls), so the passing n form a prefix: count them.
    count = ok.sum(-1).clamp_min(1)
    return commit_topk(conf, masked, count)


def vanilla_schedule(masked_count: Tensor, steps: int) -> Tensor:
    """LLaDA's per-step commit counts for one block: masked // steps each step, the remainder
    added one by one to the earliest steps. masked_count (B,) -> (B, steps) long."""
    base = torch.div(masked_count, steps, rounding_mode="floor")[:, None]  # (B, 1)
    rem = (masked_count % steps)[:, None]
    step = torch.arange(steps, device=masked_count.device)[None]  # (1, steps)
    return base + (step < rem).long()
