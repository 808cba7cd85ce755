"""Train a testbed model from scratch: the LLaDA SFT objective (dLLM teacher) or next-token CE (AR baseline).

    python train/pretrain.py --config configs/testbed_teacher.yaml [key=value ...]
    accelerate launch train/pretrain.py --config configs/testbed_ar.yaml max_steps=100

Top to bottom: config -> data (generated GSM8K-format problems, chat-formatted, answers padded with EOS
to a fixed length) -> model (our LLaDA architecture, or Dream's with model.arch=dream; random init or
init_from) -> loop -> final save in the public LLaDA / Dream layout (config.json + model.safetensors) plus
the tokenizer and the resolved config.

Objectives (train/objectives.py, which says how and why each one trains)
- `llada_sft` (LLaDA's SFT recipe): uniform masking of the answer, CE on the masked tokens weighted 1 / p;
  full attention. Optional shares of each batch train other states instead: `clean_prefix_frac` (every
  answer token from its clean prefix), `semi_ar_frac` (semi-autoregressive decoding states) and
  `decode_order_frac` (the states the model's own vanilla decoding visits, a `train/decode_orders.py` file).
- `causal`: next-token cross-entropy on the answer tokens up to and including the first EOS, for the
  same-architecture AR baseline (`is_causal: true` goes into its config.json).

The parts every recipe repeats (the accelerator, resuming, the optimizer step, logging, when to checkpoint)
are train/loop.py, shared with train/distill.py.

Checkpoints (`<output_dir>/checkpoint-<step>/`, written atomically by train/checkpoint.py, the same
format as train/distill.py's) hold the model in the final layout (config.json + model.safetensors, so a
checkpoint is itself a loadable model directory), the optimizer, the scheduler, every process's RNG states
(its mask generator included) and the data position. Resuming (`resume=auto`, the default) restores all of
it from the newest one, so the resumed run continues with the same losses.

Held-out eval (`eval_every` > 0, `make_eval`): every N steps and at the end the model decodes held-out problems
as `python -m infer.eval` does; a dLLM also with D2F's block-causal attention, whose shortfall is `eval/gap`.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from d2f.errors import check_output_dir
from d2f.models import ModelConfig, build_model, save_pretrained
from d2f.yaml_config import ConfigError, load_config, save_config
from train.checkpoint import save_checkpoint
from train.decode_orders import DecodeStates, load_decode_orders
from train.loop import (RunLog, checkpoint_due, find_resume, finish, make_accelerator, optimizer_step, resume,
                        time_up, write_run_config)
from train.objectives import DIGITS, OBJECTIVES, compute_loss
from train.schedule import warmup_then_decay


@dataclass
class ModelSpec:
    arch: str = "llada"  # llada (row i predicts token i) | dream (Qwen2 layout, row i-1 predicts token i)
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
                "decode_orders", "decode_order_frac", "semi_ar_frac", "semi_ar_block", "result_mask_frac",
                "mixed_precision")


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
    result_mask_frac: float = 0.0  # llada_sft: share of each batch with GSM8K calculator results masked
    seed: int = 0
    mixed_precision: str = "no"  # passed to accelerate: no | bf16 | fp16
    num_threads: int = 0  # torch.set_num_threads when > 0 (CPU runs sharing cores)
    log_every: int = 10  # TensorBoard every N steps (metrics.jsonl gets every step)
    save_every: int = 200
    keep_checkpoints: int = 2
    keep_steps: list[int] = field(default_factory=list)  # checkpoints kept whatever keep_checkpoints says
    resume: str = "auto"  # auto | none | path to a checkpoint-<step> directory
    save_dtype: str = "float32"  # dtype of the final model.safetensors
    time_limit_minutes: float = 0.0  # > 0: stop (with a checkpoint and a final save) after this long
    init_from: str = ""  # start from these weights (a model dir or a checkpoint-<step> dir) instead of random init
    eval_every: int = 0  # > 0: decode held-out problems every N steps and at the end (make_eval); 0 = off
    eval_problems: int = 100  # the first N problems of the testbed's held-out "test" split
    eval_batch_size: int = 50

    @property
    def n_decode_states(self) -> int:
        """Decoding states per batch (per process); the batch's other samples come from the data."""
        return round(self.batch_size * self.decode_order_frac)

    def validate(self):
        for name in ("batch_size", "max_steps", "save_every", "log_every", "eval_problems", "eval_batch_size"):
            # first: the shares and keep_steps below divide by some of them
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
        bad = [k for k in self.keep_steps if not 1 <= k <= self.max_steps or k % self.save_every]
        if bad:
            raise ConfigError(f"keep_steps {bad} name steps without a checkpoint: each must be a multiple of "
                              f"save_every={self.save_every} in [1, max_steps={self.max_steps}]")
        if isinstance(self.eval_every, bool) or not isinstance(self.eval_every, int) or self.eval_every < 0:
            raise ConfigError(f"eval_every must be an integer >= 0 (0 = no held-out eval), got {self.eval_every!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"mixed_precision {self.mixed_precision!r} is not one of 'no', 'bf16', 'fp16'")
        if not 0 < self.mask_eps < 1:
            raise ConfigError(f"mask_eps must be in (0, 1), got {self.mask_eps}")
        shares = ("clean_prefix_frac", "decode_order_frac", "semi_ar_frac", "result_mask_frac")
        for name in shares:
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if sum(getattr(self, name) for name in shares) > 1:
            raise ConfigError(f"{' + '.join(shares)} must be <= 1 (shares of one batch), got "
                              f"{' + '.join(str(getattr(self, name)) for name in shares)}")
        if self.semi_ar_block <= 0:
            raise ConfigError(f"semi_ar_block must be > 0, got {self.semi_ar_block}")
        n_order, n_prefix = self.n_decode_states, round(self.batch_size * self.clean_prefix_frac)
        n_semi, n_result = round(self.batch_size * self.semi_ar_frac), round(self.batch_size * self.result_mask_frac)
        if n_order + n_prefix + n_semi + n_result > self.batch_size:  # each share is rounded on its own
            raise ConfigError(f"{', '.join(shares)} round to {n_prefix} + {n_order} + {n_semi} + {n_result} samples, "
                             f"more than batch_size={self.batch_size}; lower one of them")
        if n_order >= self.batch_size:
            raise ConfigError(f"decode_order_frac={self.decode_order_frac} leaves no data samples in a batch of "
                             f"{self.batch_size}; lower it")
        if self.decode_order_frac > 0 and n_order == 0:
            raise ConfigError(f"decode_order_frac={self.decode_order_frac} rounds to 0 decoding states in a batch of "
                             f"{self.batch_size}; raise it to at least {1 / self.batch_size:.3g} or set it to 0")
        for name in ("semi_ar_frac", "result_mask_frac"):
            if getattr(self, name) > 0 and self.objective != "llada_sft":
                raise ConfigError(f"{name} > 0 needs objective llada_sft, got objective {self.objective!r}")
        if self.decode_order_frac > 0 and (self.objective != "llada_sft" or not self.decode_orders):
            raise ConfigError("decode_order_frac > 0 needs objective llada_sft and a decode_orders file "
                             "(python train/decode_orders.py --model <teacher> --n <problems> --out <file>)")
        if self.model.arch not in ("llada", "dream"):
            raise ConfigError(f"model.arch {self.model.arch!r} is not 'llada' or 'dream'")
        if self.model.arch == "dream" and self.clean_prefix_frac > 0:
            raise ConfigError("clean_prefix_frac > 0 needs model.arch llada: its two-copy layout predicts each token "
                              "at its own slot, while a Dream model predicts it one row earlier")
        if self.data.num_problems <= 0 or self.data.answer_len <= 0:
            raise ConfigError(f"data.num_problems and data.answer_len must be > 0, got {self.data.num_problems} and "
                              f"{self.data.answer_len}")


# ---- data --------------------------------------------------------------------------------------

def build_dataset(cfg: PretrainConfig, tokenizer):
    """The training sequences: cfg.data.num_problems generated problems, answers EOS-padded to data.answer_len."""
    from d2f.data.gsm import make_problems
    from d2f.data.tokenizer import encode_problems
    return encode_problems(make_problems("train", cfg.data.num_problems, seed=cfg.data.seed), tokenizer,
                           cfg.data.answer_len)


def load_data(cfg: PretrainConfig, tokenizer) -> list[tuple[list[int], int]]:
    """build_dataset, checked against the model's context length."""
    data = build_dataset(cfg, tokenizer)
    longest = max(len(ids) for ids, _ in data)  # prompt + answer padded to answer_len
    if longest > cfg.model.max_position_embeddings:
        raise ConfigError(f"model.max_position_embeddings {cfg.model.max_position_embeddings} is shorter than the "
                          f"longest training sequence ({longest} tokens); raise it or lower data.answer_len")
    return data


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


def build_decode_states(cfg: PretrainConfig, data, tokenizer):
    """The decoding states of `cfg.decode_orders`, checked against this recipe's data (same problems)."""
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


# ---- held-out evaluation -------------------------------------------------------------------------

def make_eval(cfg: PretrainConfig, tokenizer):
    """A function (model, step) -> metrics, or None when eval_every is 0.

    It decodes the first eval_problems held-out problems with the testbed's settings, as `python -m infer.eval
    --limit N` does, and writes infer.eval's predictions and summary to <output_dir>/eval/step-<N>/<mode>/.
    The AR baseline decodes with mode ar. A dLLM decodes with its own vanilla decoding, and its weights again
    with D2F's block-causal attention and no adapter: eval/gap, the points lost without the later blocks, is
    what D2F distillation will have to win back, so it is worth watching while the teacher trains.
    """
    if cfg.eval_every == 0:
        return None
    from infer.decode_config import TESTBED, DecodeConfig
    from infer.eval import evaluate, load_problems, make_prompts

    problems = load_problems("testbed", "test", cfg.eval_problems)
    prompts = make_prompts(tokenizer, problems, shots=0, source="testbed")
    modes = ("ar",) if cfg.objective == "causal" else ("vanilla", "d2f")

    def run(model, step: int) -> dict:
        model.eval()
        out, shown = {}, []
        for mode in modes:
            with torch.no_grad():
                s = evaluate(model, tokenizer, problems, prompts, DecodeConfig(**TESTBED[mode]),
                             Path(cfg.output_dir) / "eval" / f"step-{step}" / mode, batch_size=cfg.eval_batch_size,
                             meta={"step": step}, overwrite=True, progress=False)
            out[f"eval/{mode}_accuracy"] = s["accuracy"]
            out[f"eval/{mode}_answer_tokens"] = s["answer_tokens_mean"]
            out[f"eval/{mode}_tokens_per_forward"] = s["tokens_per_forward"]
            shown.append(f"{mode} {s['accuracy']:.1%} ({s['correct']}/{s['n']}, answers of {s['answer_tokens_mean']:.1f} "
                         "tokens)")
        if "d2f" in modes:
            out["eval/gap"] = out["eval/vanilla_accuracy"] - out["eval/d2f_accuracy"]
            shown.append(f"block-causal gap {100 * out['eval/gap']:.1f} points")
        model.train()
        print(f"[pretrain] step {step} held-out eval: {'; '.join(shown)}")
        return out

    return run


# ---- setup ---------------------------------------------------------------------------------------

def calculator_vocab(tokenizer, name: str) -> list[str]:
    """Each token id's text, for result_mask_frac's states, which find `<<a*b=c>>` results by token text."""
    vocab_text = [tokenizer.decode([i]) for i in range(len(tokenizer))]
    if "=" not in vocab_text or not any(DIGITS.fullmatch(t) for t in vocab_text):  # number_spans' digits
        raise ConfigError(f"result_mask_frac > 0 needs a tokenizer with a bare '=' token and digit tokens (GSM8K "
                          f"calculator annotations, <<a*b=c>>); tokenizer {name!r} has none: set result_mask_frac=0")
    return vocab_text


def model_config(cfg: PretrainConfig, tokenizer) -> ModelConfig:
    m = cfg.model
    return ModelConfig(arch=m.arch, qkv_bias=m.arch == "dream", vocab_size=len(tokenizer),
                       hidden_size=m.hidden_size, num_layers=m.num_layers, num_heads=m.num_heads,
                       num_kv_heads=m.num_kv_heads, intermediate_size=m.intermediate_size,
                       rope_theta=m.rope_theta, max_position_embeddings=m.max_position_embeddings,
                       mask_token_id=tokenizer.mask_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, is_causal=cfg.objective == "causal")


def init_weights(model, path: str | Path, what: str = "the checkpoint") -> None:
    """Copy every tensor of a model directory (config.json + safetensors; a checkpoint-<step> directory is
    one) into `model`: `init_from` and resuming both load weights this way.

    Only tensors matter, not the attention flag: an AR baseline (is_causal) initialises a dLLM, the
    AR-to-diffusion adaptation that Dream and DiffuLLaMA use to train dLLMs with less compute."""
    from d2f.models import from_pretrained
    from d2f.models.convert import llada_to_dream
    source = from_pretrained(Path(path), dtype=torch.float32)
    state = source.state_dict()
    if source.config.arch == "llada" and model.config.arch == "dream":  # Dream from AR weights, as from Qwen2.5
        state = llada_to_dream(state, source.config.num_layers)
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


def make_optimizer(cfg: PretrainConfig, model):
    """AdamW with weight decay on the matrices only (two parameter groups), and the warmup + cosine schedule."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    return optimizer, warmup_then_decay(optimizer, cfg.warmup_steps, cfg.max_steps, "cosine", cfg.min_lr_ratio)


def train(cfg: PretrainConfig, on_step=None) -> dict:
    """Run (or resume) training; returns {"step", "losses" (per step of this call), "output_dir", "seconds"}.

    on_step(step, loss), if given, is called after every step (and its checkpoint); tests use it to
    interrupt a run at a chosen step. Longer than a helper should be on purpose: it is the recipe, read top
    to bottom (checks, data, model, resume, loop, final save), as train/distill.py's `main`.
    """
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
    data = load_data(cfg, tokenizer)
    order = EpochPermutations(len(data), cfg.seed)
    states = build_decode_states(cfg, data, tokenizer) if cfg.decode_order_frac > 0 else None
    vocab_text = calculator_vocab(tokenizer, cfg.tokenizer) if cfg.result_mask_frac > 0 else None
    model = build_model(model_config(cfg, tokenizer), seed=cfg.seed)
    optimizer, scheduler = make_optimizer(cfg, model)
    # the masks are drawn from a generator of our own (one stream per process), saved in every checkpoint
    generators = {"mask": torch.Generator().manual_seed(cfg.seed * 1000 + rank)}

    step, position = 0, 0  # optimizer steps done, data samples consumed (all processes)
    ckpt, changed = find_resume(cfg, RESUME_FIXED)
    if ckpt is None and cfg.init_from:
        init_weights(model, cfg.init_from, "init_from")
        accelerator.print(f"initialised the weights from {cfg.init_from}")
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)
    if ckpt is not None:
        state = resume(accelerator, ckpt, changed, out, load_model=lambda d: init_weights(raw, d), optimizer=optimizer,
                       scheduler=scheduler, generators=generators, lr=cfg.lr, weight_decays=[cfg.weight_decay, 0.0],
                       betas=(cfg.beta1, cfg.beta2))
        step, position = state["step"], state["position"]
    write_run_config(accelerator, cfg, out)
    accelerator.print(f"{cfg.objective}: {sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M parameters, "
                      f"{len(data)} problems, {world} process(es) x batch {cfg.batch_size}")
    log = RunLog(accelerator, out, cfg.max_steps, step, cfg.objective, cfg.log_every)
    evaluate = make_eval(cfg, tokenizer) if accelerator.is_main_process else None
    # data samples per step: the decoding-state share of the batch is drawn from `states` instead
    n_order = cfg.n_decode_states
    global_batch = (cfg.batch_size - n_order) * world

    def checkpoint():  # every rank: each saves its own RNG and mask-generator states
        save_checkpoint(accelerator, out, step, save_model=lambda d: save_pretrained(raw, d, dtype=torch.float32),
                        optimizer=optimizer, scheduler=scheduler, trainer_state={"position": position},
                        config=cfg, keep_last=cfg.keep_checkpoints, keep_steps=cfg.keep_steps,
                        generators=generators)

    losses, t_start = [], time.time()
    model.train()
    while step < cfg.max_steps:
        idx = order.indices(position, global_batch)[rank::world]
        input_ids, prompt_lens = collate([data[i] for i in idx], tokenizer.eos_token_id)  # (b, L), (b,)
        input_ids, prompt_lens = input_ids.to(accelerator.device), prompt_lens.to(accelerator.device)
        # drawn before the data's masks, from the same saved generator, so resume stays exact
        order_batch = states.sample(n_order, generators["mask"], accelerator.device) if states is not None else None
        lr = scheduler.get_last_lr()[0]  # the rate this step's update uses
        with accelerator.autocast():
            loss = compute_loss(model, cfg, input_ids, prompt_lens, generators["mask"], order_batch, vocab_text)
        accelerator.backward(loss)
        grad_norm = optimizer_step(accelerator, model.parameters(), optimizer, scheduler, cfg.grad_clip)
        step += 1
        position += global_batch
        losses.append(loss.item())
        log.step((input_ids.numel() + (order_batch[0].numel() if order_batch is not None else 0)) * world)
        log.write(step, {"train/loss": losses[-1], "train/lr": lr, "train/grad_norm": float(grad_norm),
                         "train/tokens_per_s": log.tokens_per_s()})
        log.show(loss=f"{losses[-1]:.3f}", lr=f"{lr:.2e}")
        out_of_time = time_up(t_start, cfg.time_limit_minutes)
        if checkpoint_due(step, cfg.max_steps, cfg.save_every, out_of_time):
            checkpoint()
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            if evaluate is not None:  # the main process; the others wait for it at the barrier
                log.evaluate(step, evaluate, raw, step)
            accelerator.wait_for_everyone()
        if on_step is not None:
            on_step(step, losses[-1])
        if out_of_time:
            accelerator.print(f"time_limit_minutes={cfg.time_limit_minutes} reached at step {step}; stopping")
            break
    log.close()

    if accelerator.is_main_process:  # the final model, in the public LLaDA layout
        save_pretrained(raw, out, dtype=getattr(torch, cfg.save_dtype))
        tokenizer.save_pretrained(str(out))
        save_config(cfg, out / "config.yaml")
    finish(accelerator)
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
