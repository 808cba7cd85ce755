"""The training skeleton both recipes share (train/pretrain.py, train/distill.py): the accelerator, resuming,
the optimizer step, where a run reports, and when it checkpoints.

Why: the two recipes wrote these parts out each on its own and drifted apart (how the learning-rate
schedule stepped, what tokens/s meant, which messages a resume printed). Here each is written once. A
recipe still reads top to bottom (config, data, model, its loss, the loop, its own final save) and calls
these where the two do the same thing; what differs stays in the recipe: the seeding, the data order and
how trainer_state.json records its position, the model files a checkpoint holds, the loss, what is logged
and how often.

Checkpoints themselves (atomic directories, exact resume) are train/checkpoint.py; the learning-rate
schedule is train/schedule.py.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

import torch

from d2f.yaml_config import save_config
from train.checkpoint import (apply_optimizer_settings, load_checkpoint, resume_changes, resume_checkpoint,
                              truncate_metrics)


def make_accelerator(gradient_accumulation_steps: int = 1, mixed_precision: str = "no"):
    """The `accelerate.Accelerator` a recipe runs under, for every way it is launched:

        python train/<recipe>.py ...                                   one plain process (CPU or one GPU)
        accelerate launch --config_file configs/accelerate/cpu_ddp.yaml   DDP over gloo, several CPU processes
        accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml   DeepSpeed ZeRO-2

    Why not a plain `Accelerator()`: several processes without GPUs need the gloo backend, and (except under
    DeepSpeed, which sets up its own process group) accelerate must be told it is on the CPU, or it silently
    runs the processes side by side without synchronising their gradients. A launch that asks for several
    processes but ends up with no distributed backend is an error here rather than N independent runs.
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu_multi = distributed and not torch.cuda.is_available()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    accelerator = Accelerator(gradient_accumulation_steps=gradient_accumulation_steps,
                              mixed_precision=mixed_precision, cpu=cpu_multi and not deepspeed,
                              kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if cpu_multi else [])
    if distributed and accelerator.distributed_type.value == "NO":
        raise RuntimeError(f"launched as {os.environ['WORLD_SIZE']} processes but accelerate set up no distributed "
                           "backend; check the accelerate config (see configs/accelerate/)")
    return accelerator


# ---- resume --------------------------------------------------------------------------------------

def find_resume(cfg, fixed: tuple[str, ...]) -> tuple[Path | None, dict]:
    """The checkpoint a run continues from, by `cfg.resume` (auto: the newest under `cfg.output_dir`, None if
    there is none; none: None; or a checkpoint directory), and the settings changed since it (a change under
    `fixed` is an error). Cheap: it reads no weights, so the recipes call it before any heavy work."""
    ckpt = resume_checkpoint(cfg.output_dir, cfg.resume)
    return ckpt, (resume_changes(ckpt, cfg, fixed) if ckpt is not None else {})


def resume(accelerator, ckpt: Path, changed: dict, out_dir: Path, *, load_model: Callable[[Path], None], optimizer,
           scheduler, lr: float, weight_decays: list[float], generators: dict[str, torch.Generator] | None = None,
           tag: str = "", **group_settings) -> dict:
    """Restore `ckpt` (after `accelerator.prepare`; every rank), then apply this run's optimizer settings (lr,
    weight_decays per parameter group, `group_settings` such as betas and eps) over the restored ones, cut
    `<out_dir>/metrics.jsonl` back to the checkpoint's step (the steps after it are redone, so none is logged
    twice) and say what changed. Returns the checkpoint's trainer_state."""
    state = load_checkpoint(accelerator, ckpt, load_model=load_model, optimizer=optimizer, scheduler=scheduler,
                            generators=generators)
    apply_optimizer_settings(optimizer, scheduler, lr, weight_decays, **group_settings)
    if accelerator.is_main_process:
        truncate_metrics(out_dir / "metrics.jsonl", state["step"])
    accelerator.print(f"{tag}resumed from {ckpt} at step {state['step']}"
                      + "".join(f"; {k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()))
    return state


def write_run_config(accelerator, cfg, out_dir: Path) -> None:
    """Create output_dir and write the resolved config.yaml there (main process)."""
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")


# ---- one optimizer step ----------------------------------------------------------------------------

def optimizer_step(accelerator, params, optimizer, scheduler, grad_clip: float):
    """After `accelerator.backward`: clip the gradients, step the optimizer and the learning-rate schedule,
    zero the gradients. Returns the gradient norm before clipping (None on a micro-batch that only
    accumulates, inside `accelerator.accumulate`).

    The schedule stays out of `accelerator.prepare` in both recipes: accelerate's wrapper steps it once per
    process per optimizer step (it assumes the schedule is written for one process), so a cosine schedule
    would reach its end after max_steps / num_processes steps. Here it steps once per optimizer step, at
    the micro-batch that synchronises the gradients; the prepared optimizer skips the others itself.
    """
    grad_norm = accelerator.clip_grad_norm_(params, grad_clip) if accelerator.sync_gradients else None
    optimizer.step()
    if accelerator.sync_gradients:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


# ---- reporting -------------------------------------------------------------------------------------

TENSORBOARD_DIR = "tensorboard"  # <output_dir>/tensorboard: `tensorboard --logdir <output_dir>`


class RunLog:
    """Where a run reports, the same in every recipe: on the main process `metrics.jsonl` (one JSON object
    per step, {"step": ..., **scalars}; the file a resume cuts back) and `tensorboard/` (every `log_every`
    steps and the last), a tqdm bar on the local main one, and the token throughput since the previous line.
    The recipe decides what is logged."""

    def __init__(self, accelerator, out_dir: Path, total: int, initial: int, desc: str, log_every: int):
        from tqdm.auto import tqdm
        self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                        disable=not accelerator.is_local_main_process)
        self.writer = self.file = None
        if accelerator.is_main_process:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(out_dir / TENSORBOARD_DIR))
            self.file = open(out_dir / "metrics.jsonl", "a")  # after `resume` has cut it back
        self.tokens, self.t = 0, time.time()
        self.total, self.log_every = total, log_every

    def step(self, tokens: int) -> None:
        """One optimizer step done, on `tokens` tokens (all processes together)."""
        self.bar.update(1)
        self.tokens += tokens

    def tokens_per_s(self) -> float:
        """Tokens per second since the previous call (or the start of the run); starts a new window."""
        now = time.time()
        rate = self.tokens / max(now - self.t, 1e-9)
        self.tokens, self.t = 0, now
        return rate

    def write(self, step: int, scalars: dict[str, float], tensorboard: bool | None = None) -> None:
        """One line of metrics.jsonl, and the same scalars to TensorBoard when `tensorboard` says so; None:
        every `log_every` steps and at the last step (an evaluation passes True)."""
        if self.file is None:
            return
        self.file.write(json.dumps({"step": step, **scalars}) + "\n")
        self.file.flush()
        if tensorboard is None:
            tensorboard = step % self.log_every == 0 or step == self.total
        if tensorboard:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)

    def evaluate(self, step: int, evaluate, *args) -> None:
        """Run `evaluate(*args)` -> scalars and log them, always to TensorBoard, with its wall time as
        eval/seconds. That time is left out of the token throughput, which measures training alone."""
        t0 = time.time()
        scalars = evaluate(*args)
        seconds = time.time() - t0
        self.t += seconds
        self.write(step, {**scalars, "eval/seconds": seconds}, tensorboard=True)

    def show(self, **postfix) -> None:
        """Values beside the progress bar, e.g. loss="1.234"."""
        self.bar.set_postfix(**postfix)

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.writer.close()
            self.file.close()


# ---- when to checkpoint, when to stop ----------------------------------------------------------------

def checkpoint_due(step: int, max_steps: int, save_every: int, out_of_time: bool = False) -> bool:
    """Checkpoint after this step: every `save_every` steps (0: none in between), after the last step, and
    when the time limit stops the run, so a stopped run always resumes from where it stopped."""
    return step == max_steps or out_of_time or (save_every > 0 and step % save_every == 0)


def time_up(t_start: float, minutes: float) -> bool:
    """`minutes` > 0 and that long has passed since t_start (a time.time())."""
    return minutes > 0 and time.time() - t_start > 60 * minutes


def finish(accelerator) -> None:
    """The end of a run, after the recipe's final files: every process waits for them, then the process
    group (if any) is torn down."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
