"""D2F asymmetric distillation: teach a LoRA student block-causal decoding (docs/design.md §5).

    accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml \\
        train/distill.py --config configs/d2f_llada.yaml [key=value ...]
    python train/distill.py --config configs/d2f_tiny.yaml max_steps=100 output_dir=runs/tiny

One step: take clean `prompt + answer` sequences, mask the answer block by block with ratios
that grow along the answer (`d2f.noise`), run the same noisy batch through
  - the teacher: the frozen base model (LoRA disabled), full attention, no gradient, and
  - the student: base + LoRA, block-causal attention (answer block k sees the prompt and
    blocks 0..k only),
and pull the student's distribution at masked positions towards the teacher's (`d2f.losses`).
Only the LoRA weights train. The result is a standard PEFT adapter on top of the teacher.

A second round (configs/d2f_tiny_states.yaml) starts from such an adapter (model.adapter) and draws part of
each batch from the states its own D2F decoding visits (data.student_states, train/student_states.py), which
the teacher reads with full attention and the student block-causally, as above.

Data: a hub data set or a .jsonl with a prompt (`prompt`/`question`) and an answer
(`answer`/`response`) field -- or pre-tokenized `prompt_ids`/`answer_ids`. Each sample becomes
`prompt + answer + EOS padding`, truncated to data.max_length (no packing); answers should come
from the teacher itself (scripts/make_distill_data.py).

Outputs in output_dir: config.yaml (resolved), adapter/ (PEFT: adapter_config.json +
adapter_model.safetensors, base_model_name_or_path = model.base), merged/ (merge=true: full
weights, d2f.models format), checkpoint-<step>/ (train/checkpoint.py; resume=auto continues the
newest exactly), metrics.jsonl and tensorboard/ (loss parts, lr, grad norm, tokens/s, eval).

The file reads top to bottom: config -> data -> model -> one step -> eval hook -> the recipe
(checks, processes + model, resume, loop, save). The parts every recipe repeats (the accelerator,
resuming, the optimizer step, logging, when to checkpoint) are train/loop.py, shared with
train/pretrain.py.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from d2f import masks
from d2f.data.records import read_records, resolve_fields
from d2f.errors import check_output_dir, check_output_location
from d2f.losses import d2f_distill_loss, padding_blocks
from d2f.noise import SCHEDULES, add_block_noise
from d2f.yaml_config import ConfigError, load_config
from train.checkpoint import save_checkpoint
from train.loop import (RunLog, checkpoint_due, find_resume, finish, make_accelerator, optimizer_step, resume,
                        write_run_config)
from train.schedule import KINDS, warmup_then_decay
from train.student_states import StudentStates, load_student_states

REPO = Path(__file__).resolve().parents[1]

# LoRA targets of the public D2F recipe: the attention projections, by our (= the public
# checkpoints') module names.
DEFAULT_TARGETS = {"llada": ["q_proj", "k_proj", "v_proj", "attn_out"],
                   "dream": ["q_proj", "k_proj", "v_proj", "o_proj"]}


# =============================================================================================
# Config
# =============================================================================================

@dataclass
class ModelSection:
    base: str = "GSAI-ML/LLaDA-8B-Instruct"  # the teacher: local dir, hub id or preset (tiny-llada)
    tokenizer: str | None = None  # default: same as base (not needed for pre-tokenized data)
    dtype: str = "bfloat16"  # weights of the frozen base; LoRA weights train in float32
    gradient_checkpointing: bool = False
    adapter: str = ""  # start the LoRA from this adapter dir (a round on the student's own decoding states
    #                    continues the student it recorded); its r, alpha and targets must be lora's


@dataclass
class LoraSection:
    r: int = 32
    alpha: int = 32
    dropout: float = 0.1
    target_modules: list[str] | None = None  # default: DEFAULT_TARGETS[arch]


@dataclass
class DataSection:
    source: str = "Lansechen/bs17k_collection_filtered_hard_maxlength600"  # hub id or .jsonl path
    split: str = "train"  # hub split
    prompt_field: str | None = None  # default: "prompt" or "question"
    answer_field: str | None = None  # default: "answer" or "response"
    chat_template: bool = True  # wrap prompts in the tokenizer's chat template (user turn)
    answer_end: str | None = None  # token appended after the answer, before EOS padding
    max_length: int = 512  # every sequence is padded (with EOS) / truncated to this
    limit: int | None = None  # use only the first N records
    teacher_answers: int = 0  # > 0 and `source` (a .jsonl) missing: write it first, the teacher's answers to
    #                           this many testbed train problems (scripts/make_distill_data.py)
    teacher_decoding: str = "vanilla"  # how those answers are decoded: "vanilla" (one token per forward, the
    #                                    teacher's best answers) or "fast-dllm" (prefix cache, threshold 0.9, ~10x faster)
    student_states: str = ""  # a train/student_states.py file: the states model.adapter's D2F decoding visits;
    #                           written on first use (testbed D2F setting) when it does not exist
    student_state_frac: float = 0.0  # share of each micro-batch drawn from those states instead of the data


@dataclass
class NoiseSection:
    block_size: int = 16
    schedule: str = "monotone"  # or "random" (ablation)
    p_min: float = 0.2
    p_max: float = 0.7
    loss_on_eos_blocks: bool = True  # train on all-EOS padding blocks (what the public code does)


@dataclass
class OptimSection:
    lr: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    schedule: str = "constant"  # constant | cosine | linear (after warmup)
    warmup_steps: int = 0


@dataclass
class EvalSection:
    every: int = 0  # decode a few prompts every N steps with the D2F decoder; 0 = off
    num_prompts: int = 4
    source: str | None = None  # hub id / .jsonl; default: the first prompts of the training data
    max_new_tokens: int = 128
    gold_field: str | None = None  # e.g. "final": report accuracy with d2f.data.extract.is_correct


@dataclass
class DistillConfig:
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataSection = field(default_factory=DataSection)
    noise: NoiseSection = field(default_factory=NoiseSection)
    optim: OptimSection = field(default_factory=OptimSection)
    eval: EvalSection = field(default_factory=EvalSection)
    output_dir: str = "runs/d2f"
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 1  # sequences per process per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    seed: int = 0
    log_every: int = 10  # TensorBoard every N steps (metrics.jsonl gets every step)
    save_every: int = 500  # checkpoint every N steps (and at the end); 0 = only at the end
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto (latest checkpoint in output_dir) | none | path to a checkpoint
    merge: bool = False  # also write merged full weights to <output_dir>/merged
    targets: str = "teacher"  # teacher: the teacher's distribution (D2F); data: the clean tokens (plain
    #                           masked-token CE on the same noise and attention, the ablation of distillation)


def validate(cfg: DistillConfig) -> None:
    """Cheap checks that need neither data nor weights; each error names the bad value."""
    n, d, o = cfg.noise, cfg.data, cfg.optim
    if d.max_length < 2:
        raise ConfigError(f"data.max_length must be >= 2, got {d.max_length}")
    if not 0 < n.block_size < d.max_length:
        raise ConfigError(f"noise.block_size={n.block_size} does not fit data.max_length={d.max_length}: "
                          "need 0 < block_size < max_length so a prompt and at least one answer block fit")
    if n.schedule not in SCHEDULES:
        raise ConfigError(f"noise.schedule {n.schedule!r} is not one of {SCHEDULES}")
    if not 0.0 < n.p_min <= n.p_max <= 1.0:
        raise ConfigError(f"noise ratios need 0 < p_min <= p_max <= 1, got p_min={n.p_min}, p_max={n.p_max}")
    for name in ("max_steps", "batch_size", "grad_accum"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name} must be > 0, got {getattr(cfg, name)}")
    if cfg.lora.r <= 0:
        raise ConfigError(f"lora.r must be > 0, got {cfg.lora.r}")
    if o.schedule not in KINDS:
        raise ConfigError(f"optim.schedule {o.schedule!r} is not one of {KINDS}")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas needs two values in [0, 1), got {o.betas}")
    if not o.lr > 0:
        raise ConfigError(f"optim.lr must be > 0, got {o.lr}")
    if not o.eps > 0:
        raise ConfigError(f"optim.eps must be > 0, got {o.eps}")
    if o.weight_decay < 0:
        raise ConfigError(f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    if not o.grad_clip > 0:
        raise ConfigError(f"optim.grad_clip must be > 0 (the largest gradient norm), got {o.grad_clip}")
    if o.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    if cfg.lora.alpha <= 0:
        raise ConfigError(f"lora.alpha must be > 0, got {cfg.lora.alpha}")
    if not 0 <= cfg.lora.dropout < 1:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {cfg.lora.dropout}")
    if d.teacher_answers < 0 or (d.teacher_answers > 0 and not d.source.endswith(".jsonl")):
        raise ConfigError(f"data.teacher_answers={d.teacher_answers} needs a count >= 0 and a .jsonl data.source to "
                          f"write, got source {d.source!r}")
    if d.teacher_decoding not in ("vanilla", "fast-dllm"):
        raise ConfigError(f"data.teacher_decoding {d.teacher_decoding!r} is not one of 'vanilla' or 'fast-dllm'")
    if d.limit is not None and d.limit <= 0:
        raise ConfigError(f"data.limit must be > 0 (or null for all), got {d.limit}")
    for name in ("log_every",):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name} must be > 0, got {getattr(cfg, name)}")
    for name in ("save_every", "keep_checkpoints"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    e = cfg.eval
    if e.every < 0 or (e.every > 0 and (e.num_prompts <= 0 or e.max_new_tokens <= 0)):
        raise ConfigError(f"eval needs every >= 0, and num_prompts > 0 and max_new_tokens > 0 when on; got every="
                          f"{e.every}, num_prompts={e.num_prompts}, max_new_tokens={e.max_new_tokens}")
    if cfg.targets not in ("teacher", "data"):
        raise ConfigError(f"targets {cfg.targets!r} is not one of 'teacher' (distillation) or 'data' (masked-token CE)")
    if not 0.0 <= d.student_state_frac < 1.0:
        raise ConfigError(f"data.student_state_frac must be in [0, 1), got {d.student_state_frac}")
    n_states = round(cfg.batch_size * d.student_state_frac)
    if d.student_state_frac > 0:
        if not d.student_states:
            raise ConfigError("data.student_state_frac > 0 needs data.student_states (a train/student_states.py file, "
                              "written on first use from model.adapter)")
        if not 0 < n_states < cfg.batch_size:
            raise ConfigError(f"data.student_state_frac={d.student_state_frac} of batch_size {cfg.batch_size} rounds to "
                              f"{n_states} states per micro-batch; it must leave at least one state and one data sample")
        if not Path(d.student_states).is_file() and not cfg.model.adapter:
            raise ConfigError(f"data.student_states {d.student_states!r} does not exist and model.adapter is empty: the "
                              "states are recorded from a student; set model.adapter to its adapter dir")
        if not Path(d.student_states).is_file() and cfg.eval.max_new_tokens % n.block_size:
            raise ConfigError(f"the student states are recorded with eval.max_new_tokens={cfg.eval.max_new_tokens} "
                              f"answer slots, which noise.block_size={n.block_size} must divide")
        if cfg.targets == "data":
            raise ConfigError("targets=data trains on clean tokens, which decoding states do not have; use "
                              "targets=teacher with data.student_state_frac > 0")
    if cfg.model.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"model.dtype {cfg.model.dtype!r} is not one of float32, bfloat16, float16")


def check_data_source(d: DataSection) -> None:
    """Before any model loads: a data.source that data.teacher_answers would write (it does not exist yet)
    must be a file path that can be written, or the teacher's answers are decoded only to be thrown away."""
    p = Path(d.source).expanduser()
    if d.teacher_answers <= 0 or p.is_file():
        return
    if p.is_dir():
        raise ConfigError(f"data.source {d.source!r} is a directory, but data.teacher_answers={d.teacher_answers} "
                          "writes the teacher's answers to a .jsonl file: set data.source to a file path (e.g. "
                          f"{str(p / 'teacher_answers.jsonl')!r}), or to an existing data file")
    check_output_location(p, "data.source", ConfigError)


def check_model_source(name: str) -> None:
    """Fail fast on a teacher path that does not exist (before downloading or loading anything)."""
    from d2f.models import refs
    refs.check("model", name, ConfigError, name="model.base")


def check_adapter(m: ModelSection, lora: LoraSection) -> None:
    """model.adapter, when set: an adapter dir whose LoRA shape is lora's (its weights are loaded into it)."""
    if not m.adapter:
        return
    import json
    path = Path(m.adapter) / "adapter_config.json"
    if not path.is_file():
        raise ConfigError(f"model.adapter {m.adapter!r} is not a LoRA adapter directory (no adapter_config.json); "
                          "point it at the adapter/ of a finished run")
    a = json.loads(path.read_text())
    have = (a.get("r"), a.get("lora_alpha"), sorted(a.get("target_modules") or []))
    want = (lora.r, lora.alpha, sorted(lora.target_modules or have[2]))
    if have != want:
        raise ConfigError(f"model.adapter {m.adapter!r} has r={have[0]}, alpha={have[1]}, targets={have[2]}, but lora "
                          f"is r={want[0]}, alpha={want[1]}, targets={want[2]}: set lora to the adapter's shape")


# =============================================================================================
# Data: records -> token ids -> fixed-length sequences
# =============================================================================================

def make_teacher_answers(cfg: DistillConfig) -> None:
    """Write data.source from the teacher on first use: its answers to data.teacher_answers testbed train
    problems, decoded as data.teacher_decoding says (gen 128, block 32: the testbed's setting).
    The main process writes (atomically, with progress lines); the others wait for the file."""
    out = Path(cfg.data.source)
    cmd = [sys.executable, str(REPO / "scripts" / "make_distill_data.py"),
           "--model", cfg.model.base, "--source", "testbed", "--n", str(cfg.data.teacher_answers), "--out", str(out),
           "--mode", cfg.data.teacher_decoding, "--max-new-tokens", "128", "--block-size", "32", "--batch-size", "100"]
    if cfg.model.tokenizer:
        cmd += ["--tokenizer", cfg.model.tokenizer]
    write_first(out, cmd, f"the teacher's answers to {cfg.data.teacher_answers} testbed train problems")


def make_student_states(cfg: DistillConfig) -> None:
    """Write data.student_states on first use: model.adapter's D2F decoding of the data's prompts, with
    eval.max_new_tokens answer slots, block noise.block_size and the recorder's thresholds (tau_add 0.7,
    tau_act 0.95, tau_conf 0.99: the testbed's); for others run train/student_states.py yourself."""
    d = cfg.data
    cmd = [sys.executable, str(REPO / "train" / "student_states.py"), "--model", cfg.model.base,
           "--adapter", cfg.model.adapter, "--data", d.source, "--split", d.split,
           "--block-size", str(cfg.noise.block_size), "--max-new-tokens", str(cfg.eval.max_new_tokens),
           "--out", d.student_states,
           "--chat-template" if d.chat_template else "--no-chat-template"]
    for flag, value in (("--prompt-field", d.prompt_field), ("--limit", d.limit), ("--tokenizer", cfg.model.tokenizer)):
        if value:
            cmd += [flag, str(value)]
    write_first(Path(d.student_states), cmd, f"the states {cfg.model.adapter}'s D2F decoding visits")


def write_first(out: Path, cmd: list[str], what: str) -> None:
    """Run `cmd`, which writes `out` atomically, on the main process; the others wait for the file."""
    if os.environ.get("RANK", "0") != "0":
        while not out.is_file():
            time.sleep(2)  # the launcher stops every process if the main one fails
        return
    print(f"[distill] {out} does not exist: writing {what} first", flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise ConfigError(f"could not write {str(out)!r} (see the lines above)")


def tokenizer_source(m: ModelSection) -> str | None:
    """model.tokenizer, else the base's own tokenizer (d2f.models.refs.own_tokenizer)."""
    from d2f.models import refs
    if m.tokenizer:
        refs.check("tokenizer", m.tokenizer, ConfigError, name="model.tokenizer")
        return m.tokenizer
    return refs.own_tokenizer(m.base)


def load_tokenizer(name: str):
    from d2f.models import refs
    return refs.load_tokenizer(name, ConfigError, fix="set model.tokenizer to a directory holding tokenizer.json")


def tokenize(records, pf: str, af: str, tokenizer, chat_template: bool, answer_end: str | None):
    """[(prompt_ids, answer_ids)] -- the answer without EOS (added when padding)."""
    if pf == "prompt_ids":
        return [(list(r[pf]), list(r[af])) for r in records]
    if tokenizer is None:
        raise ConfigError("text data needs a tokenizer: set model.tokenizer (or use a model.base that ships one)")
    from d2f.data.tokenizer import prompt_ids
    end = []
    if answer_end:
        end = tokenizer(answer_end, add_special_tokens=False)["input_ids"]
    return [(prompt_ids(tokenizer, str(r[pf]), chat_template),
             tokenizer(str(r[af]), add_special_tokens=False)["input_ids"] + end) for r in records]


def build_sequences(pairs, max_length: int, block_size: int, eos_id: int, vocab: int | None = None):
    """prompt + answer + EOS padding, truncated to max_length.

    Returns ids (N, max_length) long, prompt_len (N,) long, and how many pairs were dropped
    because their prompt leaves less than one answer block.
    """
    rows, plens, dropped = [], [], 0
    for i, (prompt, answer) in enumerate(pairs):
        if vocab is not None and not all(isinstance(t, int) and 0 <= t < vocab for t in prompt + answer):
            bad = next(t for t in prompt + answer if not (isinstance(t, int) and 0 <= t < vocab))
            raise ConfigError(f"record {i} has token id {bad!r}, not an id of the model's vocabulary [0, {vocab}): "
                              "the data or the tokenizer belongs to another model")
        if len(prompt) > max_length - block_size:
            dropped += 1
            continue
        seq = (prompt + answer)[:max_length]
        rows.append(seq + [eos_id] * (max_length - len(seq)))
        plens.append(len(prompt))
    if not rows:
        raise ConfigError(f"no sample fits: every prompt is longer than data.max_length - noise.block_size "
                          f"= {max_length} - {block_size}; raise data.max_length")
    return torch.tensor(rows, dtype=torch.long), torch.tensor(plens, dtype=torch.long), dropped


def micro_batch(n: int, batch_size: int, world: int, rank: int, seed: int, index: int) -> torch.Tensor:
    """Sample indices of this rank's share of global micro-batch `index`.

    Each epoch is a seeded permutation cut into global batches of batch_size * world (the
    incomplete tail is dropped); rank r takes slice r. A pure function of `index`, so the data
    position of a run is one integer and resuming needs no sampler state.
    """
    gb = batch_size * world
    per_epoch = n // gb
    epoch, i = divmod(index, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919 * epoch))
    start = i * gb + rank * batch_size
    return perm[start:start + batch_size]


# =============================================================================================
# Model: teacher = frozen base, student = base + LoRA
# =============================================================================================

def lora_targets(mcfg, cfg: LoraSection) -> list[str]:
    """The LoRA target names, checked against the architecture (built on the meta device: no
    weights, no compute); a clear error when a target matches no linear module."""
    from d2f.models.io import model_class
    with torch.device("meta"):
        skeleton = model_class(mcfg)(mcfg)
    targets = list(cfg.target_modules or DEFAULT_TARGETS[mcfg.arch])
    linear_names = sorted({n.split(".")[-1] for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)})
    unknown = [t for t in targets if t not in linear_names]
    if unknown:
        raise ConfigError(f"lora.target_modules {unknown} match no linear module of the {mcfg.arch} model; "
                          f"its linear modules are {linear_names} (D2F uses {DEFAULT_TARGETS[mcfg.arch]})")
    return targets


def add_lora(model, cfg: LoraSection, targets: list[str], base_name: str):
    """Wrap with PEFT LoRA (base_model_name_or_path = the teacher, so the adapter loads on it)."""
    from peft import LoraConfig, get_peft_model
    model.name_or_path = base_name  # PEFT records it as base_model_name_or_path
    lcfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                      base_model_name_or_path=base_name)
    peft_model = get_peft_model(model, lcfg)
    for p in peft_model.parameters():  # LoRA weights train in fp32 whatever the base dtype
        if p.requires_grad:
            p.data = p.data.float()
    return peft_model


def save_adapter(peft_model, adapter_dir: Path) -> None:
    """adapter_config.json + adapter_model.safetensors (LoRA weights only, the embedding is untouched),
    and d2f_base.json: a fingerprint of the base, so the adapter is never merged into another model."""
    from d2f.models.io import write_base_fingerprint
    peft_model.save_pretrained(str(adapter_dir), save_embedding_layers=False)
    write_base_fingerprint(peft_model.get_base_model(), adapter_dir, peft_model.peft_config["default"].base_model_name_or_path)


def load_adapter_weights(peft_model, adapter_dir: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    set_peft_model_state_dict(peft_model, load_file(str(adapter_dir / "adapter_model.safetensors")))


# =============================================================================================
# One micro-batch
# =============================================================================================

def distill_step(model, peft_model, ids, prompt_len, noise: NoiseSection, mask_id: int, eos_id: int,
                 logits_shift: int, generator: torch.Generator, targets: str = "teacher",
                 states: StudentStates | None = None, n_states: int = 0) -> dict:
    """Noise the batch, run teacher (full attention) and student (block-causal), return loss parts.

    model: the (possibly DDP/DeepSpeed-wrapped) student used for the gradient; peft_model: the
    unwrapped PeftModel, whose `disable_adapter()` gives the teacher without a second copy.
    states, n_states: also draw n_states of the student's own decoding states (after the noise, from the
    same generator) and run them in the same forwards; their loss is the soft cross-entropy at their
    in-flight masked slots (weight 1: no ratio drew them), and `loss` is the two parts' mean weighted by
    their number of samples. Their parts are logged as states_kl and states_agreement.
    """
    noised = add_block_noise(ids, prompt_len, noise.block_size, mask_id, generator,
                             noise.schedule, noise.p_min, noise.p_max)
    masked = noised.masked
    if not noise.loss_on_eos_blocks:
        masked = masked & ~padding_blocks(ids, prompt_len, noise.block_size, eos_id)
    x, plen, key_valid = noised.noisy_ids, prompt_len, None
    n = ids.shape[0]
    if n_states:
        sx, splen, skv, loss_at = (t.to(ids.device) for t in states.sample(n_states, generator))
        x, plen = torch.cat([x, sx]), torch.cat([plen, splen])  # (n + n_states, L), (n + n_states,)
        key_valid = torch.cat([torch.ones_like(ids, dtype=torch.bool), skv])  # states are right-padded
    with torch.no_grad(), peft_model.disable_adapter():
        teacher_logits = peft_model(x, mask=masks.full(key_valid) if n_states else None)  # (B, L, V) full attention
    student_logits = model(x, mask=masks.block_causal(plen, noise.block_size, key_valid))
    parts = d2f_distill_loss(student_logits[:n], teacher_logits[:n], masked, noised.ratio, logits_shift,
                             data_targets=ids if targets == "data" else None)
    if not n_states:
        return parts
    sp = d2f_distill_loss(student_logits[n:], teacher_logits[n:], loss_at, loss_at.float(), logits_shift)
    parts["loss"] = (n * parts["loss"] + n_states * sp["loss"]) / (n + n_states)
    return {**parts, "states_kl": sp["kl"], "states_agreement": sp["agreement"]}


# =============================================================================================
# Evaluation hook: decode a few prompts with the pipelined D2F decoder
# =============================================================================================

def make_eval(cfg: DistillConfig, tokenizer, records, pf: str):
    """A function (peft_model, step) -> dict of metrics, or None when disabled / unavailable."""
    if cfg.eval.every <= 0:
        return None
    try:
        from infer.api import DecodeConfig, generate
    except ImportError as e:
        print(f"[distill] eval disabled: the inference engine (infer.api) is not available ({e})")
        return None
    ev = cfg.eval
    if ev.source:
        records = read_records(ev.source, cfg.data.split, ev.num_prompts)
        pf, _ = resolve_fields(records, ev.source, cfg.data.prompt_field, cfg.data.answer_field)
    records = records[:ev.num_prompts]
    if pf == "prompt_ids":
        prompts = [list(r[pf]) for r in records]
    else:
        from d2f.data.tokenizer import prompt_ids
        prompts = [prompt_ids(tokenizer, str(r[pf]), cfg.data.chat_template) for r in records]
    missing = [i for i, r in enumerate(records) if ev.gold_field and ev.gold_field not in r]
    if missing:
        raise ConfigError(f"eval.gold_field {ev.gold_field!r} is not a field of eval record {missing[0]} (its fields: "
                          f"{sorted(records[missing[0]])}); name an existing field or set it to null")
    golds = [str(r[ev.gold_field]) for r in records] if ev.gold_field else None

    def run(peft_model, step: int) -> dict:
        peft_model.eval()
        dcfg = DecodeConfig(mode="d2f", max_new_tokens=ev.max_new_tokens, block_size=cfg.noise.block_size)
        with torch.no_grad():
            results = generate(peft_model, tokenizer, prompts, dcfg)
        peft_model.train()
        out = {"eval/tokens_per_forward": sum(r.tokens_per_forward for r in results) / len(results),
               "eval/tokens_per_s": sum(r.tokens_per_s for r in results) / len(results),
               "eval/nfe": sum(r.nfe for r in results) / len(results)}
        if golds is not None:
            from d2f.data.extract import is_correct
            out["eval/accuracy"] = sum(is_correct(r.text, g) for r, g in zip(results, golds)) / len(golds)
        print(f"[distill] step {step} eval sample: {results[0].text[:300]!r}")
        return out

    return run


# what a resumed run must share with its checkpoint (the rest may change: run length, logging, eval, and
# the optimizer settings, which are applied to the restored optimizer and schedule)
RESUME_FIXED = ("model", "lora", "data", "noise", "seed", "batch_size", "grad_accum", "targets")


# =============================================================================================
# The recipe
# =============================================================================================

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="YAML config (configs/d2f_*.yaml)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. max_steps=10 lora.r=8")
    return ap.parse_args(argv)


def load_sequences(cfg: DistillConfig):
    """Everything the run reads before any weights load: the teacher's config, the LoRA targets checked
    against it, the tokenizer (None for pre-tokenized data without eval) and the fixed-length sequences.
    Writes data.source first when data.teacher_answers asks for it."""
    if cfg.data.teacher_answers > 0 and not Path(cfg.data.source).is_file():
        make_teacher_answers(cfg)
    records = read_records(cfg.data.source, cfg.data.split, cfg.data.limit)
    pf, af = resolve_fields(records, cfg.data.source, cfg.data.prompt_field, cfg.data.answer_field)
    from d2f.models import preset_config, PRESETS
    from d2f.models.io import read_config, resolve_checkpoint
    mcfg = preset_config(cfg.model.base) if cfg.model.base in PRESETS else read_config(resolve_checkpoint(cfg.model.base))
    if mcfg.is_causal:
        raise ConfigError(f"model.base {cfg.model.base!r} is a causal (AR) model; D2F distils a diffusion LM")
    if mcfg.eos_token_id is None:
        raise ConfigError(f"model.base {cfg.model.base!r} has no eos_token_id in its config; answers are EOS-padded")
    targets = lora_targets(mcfg, cfg.lora)
    tok_name = tokenizer_source(cfg.model)
    tokenizer = load_tokenizer(tok_name) if tok_name and (pf != "prompt_ids" or cfg.eval.every > 0) else None
    pairs = tokenize(records, pf, af, tokenizer, cfg.data.chat_template, cfg.data.answer_end)
    ids_all, plen_all, dropped = build_sequences(pairs, cfg.data.max_length, cfg.noise.block_size, mcfg.eos_token_id,
                                                   mcfg.embedding_size)
    return mcfg, targets, tokenizer, records, pf, ids_all, plen_all, dropped


def configure_deepspeed(accelerator, cfg: DistillConfig) -> None:
    """Under DeepSpeed, our config is the single source of the batch, accumulation and clipping numbers."""
    ds_plugin = accelerator.state.deepspeed_plugin
    if ds_plugin is not None:
        ds_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
        ds_plugin.deepspeed_config["gradient_accumulation_steps"] = cfg.grad_accum
        ds_plugin.deepspeed_config["gradient_clipping"] = cfg.optim.grad_clip


def build_student(cfg: DistillConfig, accelerator, targets: list[str]):
    """The frozen base in model.dtype with trainable float32 LoRA weights on `targets` (a PeftModel)."""
    from d2f.models import load_model
    device = torch.device("cpu") if accelerator.device.type == "cpu" else accelerator.device  # not "cpu:0"
    base = load_model(cfg.model.base, dtype=getattr(torch, cfg.model.dtype), device=device)
    if cfg.model.gradient_checkpointing:
        base.gradient_checkpointing_enable()
    peft_model = add_lora(base, cfg.lora, targets, cfg.model.base)
    peft_model.train()
    return peft_model


def save_final(peft_model, out_dir: Path, merge: bool) -> Path:
    """adapter/ (and merged/ full weights when `merge`); main process."""
    adapter_dir = out_dir / "adapter"
    save_adapter(peft_model, adapter_dir)
    if merge:
        from d2f.models import save_pretrained
        save_pretrained(peft_model.merge_and_unload(), out_dir / "merged")
    return adapter_dir


def mean_parts(accelerator, sums: dict[str, float], n: int) -> dict[str, float]:
    """{"train/<part>": value} for the loss parts summed over a step's n micro-batches: the mean over them,
    then over processes (a collective: every rank calls it)."""
    vec = torch.tensor([sums[k] / n for k in sorted(sums)], device=accelerator.device)
    vec = accelerator.reduce(vec, reduction="mean")
    return {f"train/{k}": float(v) for k, v in zip(sorted(sums), vec)}


def main(argv=None) -> dict:
    """The recipe, read top to bottom (checks, processes + model, resume, loop, save); longer than a helper
    should be on purpose, like train/pretrain.py's `train`. Returns {"history" (the metrics of every step),
    "output_dir", "step", "model" (the trained PeftModel, for in-process callers: tests, notebooks)}."""
    args = parse_args(argv)
    cfg = load_config(DistillConfig, args.config, args.overrides)

    # ---- 1. everything that can be wrong with the input, before any compute -----------------
    validate(cfg)
    check_output_dir(cfg.output_dir, "output_dir", ConfigError)
    check_data_source(cfg.data)
    check_model_source(cfg.model.base)
    check_adapter(cfg.model, cfg.lora)
    ckpt, changed = find_resume(cfg, RESUME_FIXED)
    mcfg, targets, tokenizer, records, pf, ids_all, plen_all, dropped = load_sequences(cfg)
    states, n_states = None, round(cfg.batch_size * cfg.data.student_state_frac)
    if n_states:
        if not Path(cfg.data.student_states).is_file():
            make_student_states(cfg)
        states = StudentStates(load_student_states(cfg.data.student_states), mcfg.mask_token_id, cfg.data.max_length,
                               cfg.noise.block_size, mcfg.embedding_size)
    n_data = cfg.batch_size - n_states  # data samples per micro-batch

    # ---- 2. processes, model, optimizer ------------------------------------------------------
    accelerator = make_accelerator(gradient_accumulation_steps=cfg.grad_accum)  # 1 process, DDP or DeepSpeed
    rank, world, main_proc = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    n_seq = ids_all.shape[0]
    if n_seq < n_data * world:
        raise ConfigError(f"the data has {n_seq} usable samples, fewer than one global batch "
                          f"({n_data} data samples per micro-batch x {world} processes)")
    configure_deepspeed(accelerator, cfg)
    out_dir = Path(cfg.output_dir)
    write_run_config(accelerator, cfg, out_dir)
    if main_proc:
        print(f"[distill] {n_seq} sequences of {cfg.data.max_length} tokens ({dropped} dropped: prompt too long), "
              f"{world} process(es)")
        if states is not None:
            print(f"[distill] {len(states)} decoding states of {cfg.data.student_states} ({states.dropped} dropped: too "
                  f"long), {n_states} per micro-batch beside {n_data} data samples")

    torch.manual_seed(cfg.seed + rank)
    peft_model = build_student(cfg, accelerator, targets)
    if cfg.model.adapter:  # a resumed run's checkpoint replaces these weights below
        from d2f.models.io import check_adapter_base
        check_adapter_base(peft_model.get_base_model(), cfg.model.adapter, cfg.model.base)
        load_adapter_weights(peft_model, Path(cfg.model.adapter))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    o = cfg.optim
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    scheduler = warmup_then_decay(optimizer, o.warmup_steps, cfg.max_steps, o.schedule)  # not prepared: optimizer_step
    model, optimizer = accelerator.prepare(peft_model, optimizer)
    peft_model = accelerator.unwrap_model(model)
    logits_shift = peft_model.get_base_model().config.logits_shift
    mask_id, eos_id = mcfg.mask_token_id, mcfg.eos_token_id

    # ---- 3. resume -----------------------------------------------------------------------------
    step, micro = 0, 0  # optimizer steps done, global micro-batches consumed (the data position)
    if ckpt is not None:
        state = resume(accelerator, ckpt, changed, out_dir, load_model=lambda d: load_adapter_weights(peft_model, d),
                       optimizer=optimizer, scheduler=scheduler, lr=o.lr, weight_decays=[o.weight_decay],
                       betas=tuple(o.betas), eps=o.eps, tag="[distill] ")
        step, micro = state["step"], state["micro"]

    def save(at_step: int):
        save_checkpoint(accelerator, out_dir, at_step, save_model=lambda d: save_adapter(peft_model, d),
                        optimizer=optimizer, scheduler=scheduler, trainer_state={"micro": micro},
                        config=cfg, keep_last=cfg.keep_checkpoints)

    # ---- 4. loop -------------------------------------------------------------------------------
    evaluate = make_eval(cfg, tokenizer, records, pf) if main_proc else None
    log = RunLog(accelerator, out_dir, cfg.max_steps, step, "distill", cfg.log_every)
    history = []
    while step < cfg.max_steps:
        sums: dict[str, float] = {}
        lr = scheduler.get_last_lr()[0]  # the rate this step's update uses
        tokens = 0
        for _ in range(cfg.grad_accum):
            idx = micro_batch(n_seq, n_data, world, rank, cfg.seed, micro)
            ids, plen = ids_all[idx].to(accelerator.device), plen_all[idx].to(accelerator.device)  # (b, L), (b,)
            # noise is a pure function of (seed, rank, data position): exact resume for free
            gen = torch.Generator().manual_seed(hash((cfg.seed, rank, micro)) & (2**62 - 1))
            with accelerator.accumulate(model):
                parts = distill_step(model, peft_model, ids, plen, cfg.noise, mask_id, eos_id, logits_shift, gen,
                                     cfg.targets, states, n_states)
                accelerator.backward(parts["loss"])
                grad_norm = optimizer_step(accelerator, params, optimizer, scheduler, o.grad_clip)
            micro += 1
            tokens += (ids.numel() + n_states * ids.shape[1]) * world
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
        step += 1
        log.step(tokens)
        logs = mean_parts(accelerator, sums, cfg.grad_accum)
        logs["train/lr"] = lr
        if grad_norm is not None:
            logs["train/grad_norm"] = float(grad_norm)
        logs["train/tokens_per_s"] = log.tokens_per_s()
        if main_proc:
            history.append({"step": step, **logs})
        log.write(step, logs)
        log.show(loss=f"{logs['train/loss']:.4f}", lr=f"{logs['train/lr']:.2e}")
        if evaluate is not None and step % cfg.eval.every == 0:
            log.evaluate(step, evaluate, peft_model, step)
        if checkpoint_due(step, cfg.max_steps, cfg.save_every):
            save(step)
    log.close()

    # ---- 5. save -----------------------------------------------------------------------------
    if main_proc:
        adapter_dir = save_final(peft_model, out_dir, cfg.merge)
        print(f"[distill] done: {step} steps, adapter in {adapter_dir}")
    finish(accelerator)
    # the trained PeftModel is handed back to in-process callers (tests, notebooks)
    return {"history": history, "output_dir": str(out_dir), "step": step, "model": peft_model}


if __name__ == "__main__":
    from d2f.errors import run_main
    raise SystemExit(run_main(main))
