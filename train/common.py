"""Recipe utilities shared by the training scripts (`train/pretrain.py`, `train/distill.py`).

- RNG: `seed_everything`, `rng_state` / `set_rng_state` (python, numpy, torch; plus any extra
  `torch.Generator`s a recipe owns, e.g. the one that draws diffusion masks).
- Checkpoints: `save_checkpoint` writes `<output_dir>/checkpoints/step-<N>/` atomically (everything goes
  into a temporary directory first, then one `os.replace`), so a run killed at any instant leaves
  either the previous complete checkpoint or the new complete one, never a half-written one.
  `find_checkpoint(output_dir, "auto")` returns the newest complete one (or None) and
  `load_checkpoint` restores model, optimizer, scheduler, RNG states and the recipe's own state
  (step, data position) from it.
- Schedules: `cosine_with_warmup`.
- Logging: `TBLogger`, TensorBoard scalars written only on the main process.

A recipe that stores its data position and its RNG states in the checkpoint and draws every random
number from them resumes exactly: the losses after a resume equal those of an uninterrupted run
(tests/train/test_pretrain.py checks this).
"""
from __future__ import annotations

import math
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

CKPT_DIR = "checkpoints"
STEP_RE = re.compile(r"^step-(\d+)$")


# ---- RNG ---------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict:
    """Every RNG state a recipe may draw from, as a picklable dict."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    state["generators"] = {k: g.get_state() for k, g in (generators or {}).items()}
    return state


def set_rng_state(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for k, g in (generators or {}).items():
        if k not in state["generators"]:
            raise KeyError(f"checkpoint has no state for generator {k!r} (has {list(state['generators'])})")
        g.set_state(state["generators"][k])


# ---- checkpoints -------------------------------------------------------------------------------

def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under output_dir, oldest first, as (step, path)."""
    root = Path(output_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and (p / "state.pt").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def find_checkpoint(output_dir: str | Path, resume: str) -> Path | None:
    """resume: "auto" (newest checkpoint under output_dir, None if there is none), "none", or a path."""
    if resume in ("none", "", "false", "no"):
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    p = Path(resume)
    if not (p / "state.pt").is_file():
        raise FileNotFoundError(f"resume={resume!r} is not a checkpoint directory (no state.pt in it); "
                                "pass resume=auto, resume=none or a <output_dir>/checkpoints/step-N directory")
    return p


def save_checkpoint(output_dir: str | Path, step: int, model, optimizer, scheduler, recipe_state: dict,
                    generators: dict[str, torch.Generator] | None = None, config=None, keep: int = 2,
                    extra_files: dict[str, str] | None = None) -> Path:
    """Atomically write step-<step>/ with model, optimizer, scheduler, RNG and recipe state; keep the newest `keep`.

    `model` is the unwrapped module (its state_dict is saved); `recipe_state` holds what the recipe
    needs to continue (step, data position, ...); `config` (a dataclass) is saved as config.yaml.
    """
    root = Path(output_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    state = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng_state(generators),
        "recipe": recipe_state,
    }
    torch.save(state, tmp / "state.pt")
    if config is not None:
        from d2f.config import save_config
        save_config(config, tmp / "config.yaml")
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    if final.exists():  # re-saving the same step (e.g. final save right after a periodic one)
        shutil.rmtree(final)
    os.replace(tmp, final)
    for _, old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, model, optimizer=None, scheduler=None,
                    generators: dict[str, torch.Generator] | None = None) -> dict:
    """Restore everything save_checkpoint wrote; returns the recipe state (with "step")."""
    state = torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"], generators)
    return {"step": state["step"], **state["recipe"]}


# ---- schedule ----------------------------------------------------------------------------------

def cosine_with_warmup(optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.1):
    """Linear warmup to the base lr, then cosine decay to min_ratio * base lr at total_steps."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---- logging -----------------------------------------------------------------------------------

class TBLogger:
    """TensorBoard scalars under <output_dir>/tb, written only where `enabled` (the main process)."""

    def __init__(self, output_dir: str | Path, enabled: bool = True):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(Path(output_dir) / "tb"))
        self.t0 = time.time()

    def log(self, scalars: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
