"""Train a testbed model from scratch: the LLaDA SFT objective (dLLM teacher) or next-token CE (AR baseline).

    python train/pretrain.py --config configs/testbed_teacher.yaml [key=value ...]
    accelerate launch train/pretrain.py --config configs/testbed_ar.yaml max_steps=100

Top to bottom: config -> data (generated GSM8K-format problems, chat-formatted, answers padded with EOS
to a fixed length) -> model (our LLaDA architecture, random init) -> loop -> final save in the public
LLaDA layout (config.json + model.safetensors) plus the tokenizer and the resolved config.

Objectives
- `llada_sft` (LLaDA's SFT recipe): the prompt is never masked; every answer token (EOS padding included,
  so the model learns where to stop) is replaced by [MASK] with probability p = (1 - eps) * t + eps,
  t ~ U(0, 1) per sample; the loss is the cross-entropy on masked tokens weighted 1 / p, divided by the
  sample's answer length and averaged over the batch. Full attention. `clean_prefix_frac` > 0 trains
  that share of each batch instead on predicting every answer token, masked, from its clean prefix (all
  positions in one forward over a two-copy layout, `clean_prefix_layout`, which says why the testbed
  teacher needs it). `decode_order_frac` > 0 trains that share on the states the model's own vanilla
  decoding visits (a `train/decode_orders.py` file; the loss is on the masked slots of the block being
  decoded, the positions that step chooses among; that file's docstring says why).
- `causal`: next-token cross-entropy on the answer tokens up to and including the first EOS, for the
  same-architecture AR baseline (`is_causal: true` goes into its config.json).

Checkpoints (`<output_dir>/checkpoint-<step>/`, written atomically by train/checkpoint.py, the same
format as train/distill.py's) hold the model in the final layout (config.json + model.safetensors, so a
checkpoint is itself a loadable model directory), the optimizer, the scheduler, every process's RNG states
(its mask generator included) and the data position. Resuming (`resume=auto`, the default) restores all of
it from the newest one, so the resumed run continues with the same losses.
"""
from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from d2f.yaml_config import ConfigError, load_config, save_config  # noqa: E402
from d2f.errors import check_output_dir  # noqa: E402
from d2f.models import ModelConfig, build_model, save_pretrained  # noqa: E402
from train.accelerator import make_accelerator  # noqa: E402
from train.checkpoint import (apply_optimizer_settings, load_checkpoint, resume_changes, resume_checkpoint,  # noqa: E402
                              save_checkpoint, truncate_metrics)
from train.schedule import warmup_then_decay  # noqa: E402

OBJECTIVES = ("llada_sft", "causal")


@dataclass
class ModelSpec:
    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 704
    rope_theta: float = 10000.0
    max_position_embeddings: int = 512


@dataclass
class DataSpec:
    num_problems: int = 50000  # generated train-split problems (distinct)
    seed: int = 0  # generator seed
    answer_len: int = 112  # answers (+ EOS) padded with EOS to this many tokens


# what a resumed run must share with its checkpoint; the rest may change (run length, logging, and the
# optimizer settings, which are applied to the restored optimizer and schedule)
RESUME_FIXED = ("objective", "tokenizer", "model", "data", "batch_size", "seed", "mask_eps", "clean_prefix_frac",
                "decode_orders", "decode_order_frac", "semi_ar_frac", "semi_ar_block", "mixed_precision")


@dataclass
class PretrainConfig:
    objective: str = "llada_sft"
    output_dir: str = "runs/testbed_teacher"
    tokenizer: str = "testbed/tokenizer"
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    batch_size: int = 32  # per process
    max_steps: int = 1000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    mask_eps: float = 1e-3  # llada_sft: minimum masking probability
    clean_prefix_frac: float = 0.0  # llada_sft: share of each batch predicting each answer token from its clean prefix
    decode_orders: str = ""  # llada_sft: a train/decode_orders.py file (states vanilla decoding visits)
    decode_order_frac: float = 0.0  # llada_sft: share of each batch trained on those states
    semi_ar_frac: float = 0.0  # llada_sft: share of each batch in semi-autoregressive decoding states (full attention)
    semi_ar_block: int = 32  # llada_sft: the block length of those states (vanilla decoding's block size)
    seed: int = 0
    mixed_precision: str = "no"  # passed to accelerate: no | bf16 | fp16
    num_threads: int = 0  # torch.set_num_threads when > 0 (CPU runs sharing cores)
    log_every: int = 10
    save_every: int = 200
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto | none | path to a checkpoint-<step> directory
    save_dtype: str = "float32"  # dtype of the final model.safetensors
    time_limit_minutes: float = 0.0  # > 0: stop (with a checkpoint and a final save) after this long
    init_from: str = ""  # start from these weights (a model dir or a checkpoint-<step> dir) instead of random init

    @property
    def n_decode_states(self) -> int:
        """Decoding states per batch (per process); the batch's other samples come from the data."""
        return round(self.batch_size * self.decode_order_frac)

    def validate(self):
        for name in ("batch_size", "max_steps", "save_every", "log_every"):  # first: the shares below divide them
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective {self.objective!r} is not one of {OBJECTIVES}")
        if self.save_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"save_dtype {self.save_dtype!r} must be 'float32' or 'bfloat16'")
        for name in ("lr", "beta1", "beta2", "weight_decay", "grad_clip", "min_lr_ratio", "mask_eps"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"{name} must be a finite number, got {v!r}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not self.grad_clip > 0:
            raise ConfigError(f"grad_clip must be > 0 (the largest gradient norm), got {self.grad_clip}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.keep_checkpoints < 0 or self.time_limit_minutes < 0 or self.num_threads < 0:
            raise ConfigError("keep_checkpoints, time_limit_minutes and num_threads must be >= 0, got "
                              f"{self.keep_checkpoints}, {self.time_limit_minutes}, {self.num_threads}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"mixed_precision {self.mixed_precision!r} is not one of 'no', 'bf16', 'fp16'")
        if not 0 < self.mask_eps < 1:
            raise ConfigError(f"mask_eps must be in (0, 1), got {self.mask_eps}")
        for name in ("clean_prefix_frac", "decode_order_frac", "semi_ar_frac"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.clean_prefix_frac + self.decode_order_frac + self.semi_ar_frac > 1:
            raise ConfigError(f"clean_prefix_frac + decode_order_frac + semi_ar_frac must be <= 1 (shares of one "
                             f"batch), got {self.clean_prefix_frac} + {self.decode_order_frac} + {self.semi_ar_frac}")
        if self.semi_ar_block <= 0:
            raise ConfigError(f"semi_ar_block must be > 0, got {self.semi_ar_block}")
        n_order, n_prefix = self.n_decode_states, round(self.batch_size * self.clean_prefix_frac)
        n_semi = round(self.batch_size * self.semi_ar_frac)
        if n_order + n_prefix + n_semi > self.batch_size:  # each share is rounded on its own
            raise ConfigError(f"decode_order_frac, clean_prefix_frac and semi_ar_frac round to {n_order} + {n_prefix} "
                             f"+ {n_semi} samples, more than batch_size={self.batch_size}; lower one of them")
        if n_order >= self.batch_size:
            raise ConfigError(f"decode_order_frac={self.decode_order_frac} leaves no data samples in a batch of "
                             f"{self.batch_size}; lower it")
        if self.decode_order_frac > 0 and n_order == 0:
            raise ConfigError(f"decode_order_frac={self.decode_order_frac} rounds to 0 decoding states in a batch of "
                             f"{self.batch_size}; raise it to at least {1 / self.batch_size:.3g} or set it to 0")
        if self.semi_ar_frac > 0 and self.objective != "llada_sft":
            raise ConfigError(f"semi_ar_frac > 0 needs objective llada_sft, got objective {self.objective!r}")
        if self.decode_order_frac > 0 and (self.objective != "llada_sft" or not self.decode_orders):
            raise ConfigError("decode_order_frac > 0 needs objective llada_sft and a decode_orders file "
                             "(python train/decode_orders.py --model <teacher> --n <problems> --out <file>)")
        if self.data.num_problems <= 0 or self.data.answer_len <= 0:
            raise ConfigError(f"data.num_problems and data.answer_len must be > 0, got {self.data.num_problems} and "
                              f"{self.data.answer_len}")


# ---- data --------------------------------------------------------------------------------------

def encode_problems(problems: list[dict], tokenizer, answer_len: int,
                    length_flag: str = "data.answer_len") -> list[tuple[list[int], int]]:
    """(prompt ids + answer ids + EOS padding to answer_len, prompt length) per problem.
    length_flag: the caller's name for answer_len, for the error on an answer that does not fit."""
    from d2f.data.tokenizer import prompt_ids
    eos = tokenizer.eos_token_id
    out = []
    for p in problems:
        prompt = prompt_ids(tokenizer, p["question"])
        answer = tokenizer(p["answer"], add_special_tokens=False)["input_ids"] + [eos]
        if len(answer) > answer_len:
            raise ConfigError(f"an answer has {len(answer)} tokens (with EOS), more than {length_flag}="
                             f"{answer_len}; raise {length_flag}")
        out.append((prompt + answer + [eos] * (answer_len - len(answer)), len(prompt)))
    return out


def collate(examples: list[tuple[list[int], int]], eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad with EOS to the longest sequence (LLaDA SFT: the padding counts as answer)."""
    L = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), L), eos_id, dtype=torch.long)
    for i, (ids, _) in enumerate(examples):
        input_ids[i, :len(ids)] = torch.tensor(ids)
    prompt_lens = torch.tensor([n for _, n in examples])
    return input_ids, prompt_lens  # (B, L), (B,)


class EpochPermutations:
    """The data order: an endless stream of epochs, each a fresh permutation seeded by (seed, epoch),
    so the whole data position is one integer (samples consumed) and resuming needs nothing else."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.cache = n, seed, {}

    def indices(self, position: int, global_batch: int) -> list[int]:
        out = []
        for pos in range(position, position + global_batch):
            epoch, i = divmod(pos, self.n)
            if epoch not in self.cache:
                self.cache = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
            out.append(int(self.cache[epoch][i]))
        return out


# ---- objectives --------------------------------------------------------------------------------

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
    fails when decoding reaches the first occurrence with everything after it masked (measured on the
    testbed teacher: 60/60 first results right with the copies visible, 3/60 with the suffix masked).
    Here every answer token is a computation from a clean prefix, as in next-token training.

    Returns ids (B, 2L), position ids (B, 2L), the attention mask (B, 1, 2L, 2L) and the loss positions
    (B, 2L): the mask copy's answer positions, whose targets are input_ids[:, i].
    """
    from d2f import masks
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


def llada_sft_loss(logits: torch.Tensor, input_ids: torch.Tensor, masked: torch.Tensor, p: torch.Tensor,
                   prompt_lens: torch.Tensor) -> torch.Tensor:
    """sum over masked tokens of CE / (p * answer_len), divided by the batch size (LLaDA SFT)."""
    B, L = input_ids.shape
    answer_len = (L - prompt_lens).float()  # (B,) answer + EOS padding
    weight = 1.0 / (p[:, None] * answer_len[:, None]).expand(B, L)  # (B, L)
    ce = F.cross_entropy(logits[masked].float(), input_ids[masked], reduction="none")  # (M,)
    return (ce * weight[masked]).sum() / B


def semi_ar_process(input_ids: torch.Tensor, prompt_lens: torch.Tensor, mask_id: int, eps: float, block: int,
                    generator: torch.Generator | None = None):
    """The states semi-autoregressive (block-wise) decoding visits, drawn at random: LLaDA's vanilla
    decoding fills the answer block by block, so the block being decoded is partly masked, every block
    before it is clean and every block after it is all [MASK]. Per sample: a block b of the answer,
    uniform; its tokens masked with probability p = (1-eps) t + eps, t ~ U(0, 1); everything after it masked.

    Why: under uniform masking a GSM8K result can nearly always be copied from a later occurrence
    (`<<a*b=c>>c`, and c is reused), so a small model learns to copy rather than compute, and fails when
    decoding reaches the first occurrence with everything after it masked. In these states everything
    after the block is masked, as in decoding. Attention stays full, as LLaDA was trained.

    Returns noisy ids (B, L), the loss positions (B, L): the masked slots of block b, and p (B,).
    """
    B, L = input_ids.shape
    dev = generator.device if generator is not None else input_ids.device
    t = torch.rand(B, generator=generator, device=dev).to(input_ids.device)
    p = (1 - eps) * t + eps  # (B,)
    n_blocks = (L - prompt_lens + block - 1) // block  # (B,) answer blocks (the last may be short)
    b = (torch.rand(B, generator=generator, device=dev).to(input_ids.device) * n_blocks).long()  # (B,)
    u = torch.rand(B, L, generator=generator, device=dev).to(input_ids.device)
    offset = torch.arange(L, device=input_ids.device)[None] - prompt_lens[:, None]  # (B, L) answer offset
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


def causal_targets(input_ids: torch.Tensor, prompt_lens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Labels for next-token CE: answer tokens up to and including the first EOS, -100 elsewhere."""
    B, L = input_ids.shape
    pos = torch.arange(L, device=input_ids.device)[None]  # (1, L)
    answer = pos >= prompt_lens[:, None]
    is_eos = (input_ids == eos_id) & answer
    first_eos = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full_like(prompt_lens, L - 1))
    keep = answer & (pos <= first_eos[:, None])
    return torch.where(keep, input_ids, torch.full_like(input_ids, -100))


def causal_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token CE: logits row i predicts token i+1."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def compute_loss(model, cfg: PretrainConfig, input_ids, prompt_lens, generator, order_batch=None) -> torch.Tensor:
    """The batch's loss. llada_sft: the batch is the decoding states `order_batch` (DecodeStates.sample,
    `cfg.n_decode_states` of them), then `n_prefix` clean-prefix samples, then LLaDA
    SFT; each part weighted by its share of the batch."""
    mcfg = model.config if hasattr(model, "config") else model.module.config
    if cfg.objective == "llada_sft":
        n_order = 0 if order_batch is None else order_batch[0].shape[0]
        B = input_ids.shape[0] + n_order
        n_prefix = round(B * cfg.clean_prefix_frac)  # the first n data samples, then n_semi, the rest LLaDA SFT
        n_semi = round(B * cfg.semi_ar_frac)
        loss = input_ids.new_zeros((), dtype=torch.float32)
        if n_order > 0:
            from train.decode_orders import decode_order_loss
            x, pos, pattern, loss_at, targets = order_batch
            loss = loss + decode_order_loss(model(x, pos, mask=pattern), targets, loss_at) * n_order / B
        if n_order + n_prefix + n_semi < B:
            ids, plen = input_ids[n_prefix + n_semi:], prompt_lens[n_prefix + n_semi:]
            noisy, masked, p = forward_process(ids, plen, mcfg.mask_token_id, cfg.mask_eps, generator)
            n_sft = B - n_order - n_prefix - n_semi
            loss = loss + llada_sft_loss(model(noisy), ids, masked, p, plen) * n_sft / B
        if n_semi > 0:
            ids, plen = input_ids[n_prefix:n_prefix + n_semi], prompt_lens[n_prefix:n_prefix + n_semi]
            noisy, loss_at, p = semi_ar_process(ids, plen, mcfg.mask_token_id, cfg.mask_eps, cfg.semi_ar_block,
                                                generator)
            loss = loss + semi_ar_loss(model(noisy), ids, loss_at, p, cfg.semi_ar_block) * n_semi / B
        if n_prefix > 0:
            ids, plen = input_ids[:n_prefix], prompt_lens[:n_prefix]
            both, pos, attn, loss_at = clean_prefix_layout(ids, plen, mcfg.mask_token_id)
            loss = loss + clean_prefix_loss(model(both, pos, mask=attn), ids, loss_at, plen) * n_prefix / B
        return loss
    labels = causal_targets(input_ids, prompt_lens, mcfg.eos_token_id)
    return causal_loss(model(input_ids), labels)


def build_decode_states(cfg: PretrainConfig, data, tokenizer):
    """The decoding states of `cfg.decode_orders`, checked against this recipe's data (same problems)."""
    from train.decode_orders import DecodeStates, load_decode_orders
    d = load_decode_orders(cfg.decode_orders)
    n, eos = len(d["orders"]), tokenizer.eos_token_id
    if d["seed"] != cfg.data.seed or n > len(data):
        raise ConfigError(f"{cfg.decode_orders!r} records the first {n} problems of seed {d['seed']}, not a prefix of "
                         f"this recipe's data ({len(data)} problems, data.seed={cfg.data.seed})")
    for i in range(n):  # the answers agree; the longer of the two EOS paddings is EOS beyond the shorter
        ids, plen = data[i]
        ref, ans = d["references"][i].tolist(), ids[plen:]
        k = min(len(ref), len(ans))
        if ref[:k] != ans[:k] or any(t != eos for t in ref[k:] + ans[k:]):
            raise ConfigError(f"problem {i} of {cfg.decode_orders!r} does not match this recipe's data "
                             f"(another tokenizer, or an answer longer than one of the two paddings?)")
    return DecodeStates(d, [ids[:plen] for ids, plen in data[:n]], tokenizer.mask_token_id, tokenizer.pad_token_id)


# ---- setup ---------------------------------------------------------------------------------------

def model_config(cfg: PretrainConfig, tokenizer) -> ModelConfig:
    m = cfg.model
    return ModelConfig(arch="llada", vocab_size=len(tokenizer), hidden_size=m.hidden_size, num_layers=m.num_layers,
                       num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, intermediate_size=m.intermediate_size,
                       rope_theta=m.rope_theta, max_position_embeddings=m.max_position_embeddings,
                       mask_token_id=tokenizer.mask_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, is_causal=cfg.objective == "causal")


def build_dataset(cfg: PretrainConfig, tokenizer):
    from d2f.data.gsm import make_problems
    return encode_problems(make_problems("train", cfg.data.num_problems, seed=cfg.data.seed), tokenizer,
                           cfg.data.answer_len)


def init_weights(model, path: str | Path, what: str = "the checkpoint") -> None:
    """Copy every tensor of a model directory (config.json + safetensors; a checkpoint-<step> directory is
    one) into `model`: `init_from` and resuming both load weights this way.

    Only tensors matter, not the attention flag: an AR baseline (is_causal) initialises a dLLM, the
    AR-to-diffusion adaptation that Dream and DiffuLLaMA use to train dLLMs with less compute."""
    from d2f.models import from_pretrained
    source = from_pretrained(Path(path), dtype=torch.float32)
    state = source.state_dict()
    own = model.state_dict()
    bad = [k for k in own if k not in state or state[k].shape != own[k].shape] + [k for k in state if k not in own]
    if bad:
        raise ConfigError(f"{what} {str(path)!r} does not match the configured model: "
                          f"{describe_mismatch(bad, own, state)}. {architecture_hint(model, source)}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def describe_mismatch(bad: list[str], own: dict, state: dict, first: int = 4) -> str:
    """"N tensor(s) differ (...): 'x' (model: (a, b), checkpoint: (c, d)); ..." for the first few names."""
    def shape(d, k):
        return tuple(d[k].shape) if k in d else "absent"
    shown = "; ".join(f"{k!r} (model: {shape(own, k)}, checkpoint: {shape(state, k)})" for k in bad[:first])
    more = f"; ... ({len(bad) - first} more)" if len(bad) > first else ""
    return (f"{len(bad)} tensor(s) differ (the model has {len(own)} tensors, the checkpoint {len(state)}): "
            f"{shown}{more}")


# the recipe's model.* keys and the ModelConfig fields they set
ARCHITECTURE_KEYS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")


def architecture_hint(model, source) -> str:
    """What to do about a checkpoint of another architecture: the model.* values that differ."""
    mine, theirs = getattr(model, "config", None), getattr(source, "config", None)
    diffs = [f"model.{k}={getattr(theirs, k)} (configured: {getattr(mine, k)})" for k in ARCHITECTURE_KEYS
             if mine is not None and theirs is not None and getattr(mine, k, None) != getattr(theirs, k, None)]
    if mine is not None and theirs is not None and mine.vocab_size != theirs.vocab_size:
        diffs.append(f"a tokenizer of {theirs.vocab_size} tokens (configured tokenizer: {mine.vocab_size})")
    if diffs:
        return (f"The checkpoint has {', '.join(diffs)}: set these in the recipe to match it, or drop init_from "
                "to start from random weights")
    return "Set the recipe's model.* to the checkpoint's architecture (its config.json), or drop init_from"


def train(cfg: PretrainConfig, on_step=None) -> dict:
    """Run (or resume) training; returns {"step", "losses" (per step of this call), "output_dir", "seconds"}.

    on_step(step, loss), if given, is called after every step (and its checkpoint); tests use it to
    interrupt a run at a chosen step.
    """
    from tqdm.auto import tqdm

    from d2f.data.tokenizer import load_tokenizer

    cfg.validate()
    check_output_dir(cfg.output_dir, "output_dir", ConfigError)
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    accelerator = make_accelerator(mixed_precision=cfg.mixed_precision)  # 1 process or DDP (CPU: gloo)
    rank, world = accelerator.process_index, accelerator.num_processes
    out = Path(cfg.output_dir)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    torch.manual_seed(cfg.seed)

    tokenizer = load_tokenizer(cfg.tokenizer)
    data = build_dataset(cfg, tokenizer)
    longest = max(len(ids) for ids, _ in data)  # prompt + answer padded to answer_len
    if longest > cfg.model.max_position_embeddings:
        raise ConfigError(f"model.max_position_embeddings {cfg.model.max_position_embeddings} is shorter than the "
                          f"longest training sequence ({longest} tokens); raise it or lower data.answer_len")
    order = EpochPermutations(len(data), cfg.seed)
    states = build_decode_states(cfg, data, tokenizer) if cfg.decode_order_frac > 0 else None
    model = build_model(model_config(cfg, tokenizer), seed=cfg.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    scheduler = warmup_then_decay(optimizer, cfg.warmup_steps, cfg.max_steps, "cosine", cfg.min_lr_ratio)
    # the masks are drawn from a generator of our own (one stream per process), saved in every checkpoint
    generators = {"mask": torch.Generator().manual_seed(cfg.seed * 1000 + rank)}

    step, position = 0, 0
    ckpt = resume_checkpoint(out, cfg.resume)
    changed = resume_changes(ckpt, cfg, RESUME_FIXED) if ckpt is not None else {}
    if ckpt is None and cfg.init_from:
        init_weights(model, cfg.init_from, "init_from")
        accelerator.print(f"initialised the weights from {cfg.init_from}")
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)
    if ckpt is not None:
        state = load_checkpoint(accelerator, ckpt, load_model=lambda d: init_weights(raw, d), optimizer=optimizer,
                                scheduler=scheduler, generators=generators)
        step, position = state["step"], state["position"]
        apply_optimizer_settings(optimizer, scheduler, cfg.lr, [cfg.weight_decay, 0.0], betas=(cfg.beta1, cfg.beta2))
        if accelerator.is_main_process:
            truncate_metrics(out / "metrics.jsonl", step)
        accelerator.print(f"resumed from {ckpt} at step {step}"
                          + "".join(f"; {k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()))

    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        n_params = sum(p.numel() for p in raw.parameters())
        accelerator.print(f"{cfg.objective}: {n_params / 1e6:.2f}M parameters, {len(data)} problems, "
                          f"{world} process(es) x batch {cfg.batch_size}")
    writer = metrics_file = None
    if accelerator.is_main_process:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(out / "tb"))
        metrics_file = open(out / "metrics.jsonl", "a")  # one line per logged step
    # data samples per step: the decoding-state share of the batch is drawn from `states` instead
    n_order = cfg.n_decode_states
    global_batch = (cfg.batch_size - n_order) * world

    def checkpoint():  # every rank: each saves its own RNG and mask-generator states
        save_checkpoint(accelerator, out, step, save_model=lambda d: save_pretrained(raw, d, dtype=torch.float32),
                        optimizer=optimizer, scheduler=scheduler, trainer_state={"position": position},
                        config=cfg, keep_last=cfg.keep_checkpoints, generators=generators)

    losses, t_start, t_log, tokens = [], time.time(), time.time(), 0
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not accelerator.is_local_main_process, desc=cfg.objective)
    model.train()
    while step < cfg.max_steps:
        idx = order.indices(position, global_batch)[rank::world]
        input_ids, prompt_lens = collate([data[i] for i in idx], tokenizer.eos_token_id)
        input_ids, prompt_lens = input_ids.to(accelerator.device), prompt_lens.to(accelerator.device)
        # drawn before the data's masks, from the same saved generator, so resume stays exact
        order_batch = states.sample(n_order, generators["mask"], accelerator.device) if states is not None else None
        with accelerator.autocast():
            loss = compute_loss(model, cfg, input_ids, prompt_lens, generators["mask"], order_batch)
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        position += global_batch
        tokens += (input_ids.numel() + (order_batch[0].numel() if order_batch is not None else 0)) * world
        losses.append(loss.item())
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            dt = time.time() - t_log
            scalars = {"train/loss": losses[-1], "train/lr": scheduler.get_last_lr()[0],
                       "train/grad_norm": float(grad_norm), "train/tokens_per_s": tokens / max(dt, 1e-9)}
            if writer is not None:
                for k, v in scalars.items():
                    writer.add_scalar(k, v, step)
                metrics_file.write(json.dumps({"step": step, **scalars}) + "\n")
                metrics_file.flush()
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{scalars['train/tokens_per_s']:.0f}")
            t_log, tokens = time.time(), 0
        out_of_time = cfg.time_limit_minutes > 0 and time.time() - t_start > 60 * cfg.time_limit_minutes
        if step % cfg.save_every == 0 or step == cfg.max_steps or out_of_time:
            checkpoint()
        if on_step is not None:
            on_step(step, losses[-1])
        if out_of_time:
            accelerator.print(f"time_limit_minutes={cfg.time_limit_minutes} reached at step {step}; stopping")
            break
    bar.close()
    if writer is not None:
        writer.close()
        metrics_file.close()

    if accelerator.is_main_process:
        save_pretrained(raw, out, dtype=getattr(torch, cfg.save_dtype))
        tokenizer.save_pretrained(str(out))
        save_config(cfg, out / "config.yaml")
    accelerator.wait_for_everyone()
    return {"step": step, "losses": losses, "output_dir": str(out), "seconds": time.time() - t_start}


def export_checkpoint(cfg: PretrainConfig, checkpoint: str | Path, output_dir: str | Path | None = None) -> Path:
    """Write the final-model files (config.json, model.safetensors in save_dtype, tokenizer, config.yaml)
    from a training checkpoint, e.g. to ship a run that was stopped before max_steps."""
    import json
    from d2f.data.tokenizer import load_tokenizer
    from d2f.models import from_pretrained
    from train.checkpoint import STATE_NAME
    checkpoint = Path(checkpoint)
    if not (checkpoint / STATE_NAME).is_file():
        raise FileNotFoundError(f"{str(checkpoint)!r} is not a complete checkpoint-<step> directory (no {STATE_NAME})")
    out = Path(output_dir or cfg.output_dir)
    check_output_dir(out, "output_dir", ConfigError)
    model = from_pretrained(checkpoint, dtype=torch.float32)
    save_pretrained(model, out, dtype=getattr(torch, cfg.save_dtype))
    load_tokenizer(cfg.tokenizer).save_pretrained(str(out))
    save_config(cfg, out / "config.yaml")
    step = json.loads((checkpoint / STATE_NAME).read_text())["step"]
    print(f"exported step {step} of {checkpoint} to {out}")
    return out


def main(argv: list[str] | None = None) -> dict:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="YAML file (configs/testbed_teacher.yaml, ...)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. max_steps=100 model.num_layers=4")
    ap.add_argument("--export", metavar="CHECKPOINT", default=None,
                    help="do not train: write the final-model files from this checkpoint-<step> directory")
    args = ap.parse_args(argv)
    cfg = load_config(PretrainConfig, args.config, args.overrides)
    if args.export:
        return {"output_dir": str(export_checkpoint(cfg, args.export))}
    result = train(cfg)
    print(f"done: step {result['step']}, last loss {result['losses'][-1] if result['losses'] else float('nan'):.4f}, "
          f"{result['seconds']:.0f}s, model saved to {result['output_dir']}")
    return result


if __name__ == "__main__":
    from d2f.errors import run_main
    raise SystemExit(run_main(main))
