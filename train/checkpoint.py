"""Atomic training checkpoints with exact resume, for recipes run under `accelerate`.

A checkpoint is a directory `<output_dir>/checkpoint-<step>/` holding everything needed to
continue a run bit-for-bit:

    model files        whatever the recipe's `save_model(dir)` writes (e.g. a PEFT adapter)
    optimizer.pt       optimizer state        (plain / DDP runs; DeepSpeed: its own files)
    scheduler.pt       LR scheduler state     (every run: the recipes keep it out of accelerate.prepare)
    rng_state_<r>.pt   python / numpy / torch / cuda RNG of rank r (DeepSpeed: random_states_<r>.pkl)
    generators_<r>.pt  the states of the recipe's own torch.Generators on rank r (e.g. the one that
                       draws diffusion masks), when it passes any
    trainer_state.json step, data position, ... (the recipe decides); written last
    config.yaml        the resolved config of the run

Atomicity: every rank writes into `<output_dir>/.tmp-checkpoint-<step>/`, and only when all of
them are done does the main process rename it to `checkpoint-<step>`. A run killed mid-save
leaves a `.tmp-*` directory that `latest_checkpoint` ignores (and the next save removes), so
resuming always starts from a complete checkpoint.

With DeepSpeed the model/optimizer/RNG go through `accelerator.save_state` /
`load_state` (ZeRO partitions the optimizer state across ranks); frozen parameters are left out
(`exclude_frozen_parameters`), so a LoRA checkpoint of an 8B model stays small.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from d2f.yaml_config import save_config

CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_NAME = "trainer_state.json"


def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType
    return accelerator.distributed_type == DistributedType.DEEPSPEED


# ---- RNG ------------------------------------------------------------------------------------

def rng_state() -> dict:
    """Every global RNG a training step may draw from (dropout uses torch's)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- finding checkpoints --------------------------------------------------------------------

def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (renamed into place and holding trainer_state.json), oldest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_NAME).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1][1] if ckpts else None


def resume_checkpoint(output_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint a run continues from: resume="auto" (the newest complete one under output_dir, or
    None for a fresh start), "none" (a fresh start, refused if output_dir already holds checkpoints, so
    nothing is overwritten by accident), or the path of a checkpoint directory."""
    from d2f.yaml_config import ConfigError
    if resume == "none":
        if latest_checkpoint(output_dir) is not None:
            raise ConfigError(f"output_dir {str(output_dir)!r} already holds checkpoints and resume=none: pass "
                              "resume=auto to continue that run, or choose a new output_dir")
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    if not (Path(resume) / STATE_NAME).is_file():
        raise ConfigError(f"resume={resume!r} is not a complete checkpoint directory (no {STATE_NAME}); pass "
                          "resume=auto, resume=none or an <output_dir>/checkpoint-<step> directory")
    return Path(resume)


def prune_checkpoints(output_dir: str | Path, keep_last: int, keep_steps=()) -> None:
    """Delete all but the newest `keep_last` checkpoints (keep_last <= 0 keeps everything) and those of
    `keep_steps` (milestones a later run starts from, e.g. a teacher initialised from an early AR checkpoint)."""
    if keep_last <= 0:
        return
    for step, p in list_checkpoints(output_dir)[:-keep_last]:
        if step not in keep_steps:
            shutil.rmtree(p, ignore_errors=True)


def write_json_atomic(path: str | Path, obj) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


# ---- save / load ----------------------------------------------------------------------------

def save_checkpoint(accelerator, output_dir: str | Path, step: int, *, save_model: Callable[[Path], None],
                    optimizer, scheduler, trainer_state: dict, config=None, keep_last: int = 0, keep_steps=(),
                    generators: dict[str, torch.Generator] | None = None) -> Path:
    """Write `<output_dir>/checkpoint-<step>` atomically; call on every rank (it synchronises).

    save_model(dir) is called on the main process only and writes the model files (e.g.
    `peft_model.save_pretrained(dir)`); with DeepSpeed the trainable weights are also inside the
    engine's own files, which is what `load_checkpoint` restores. `generators` are this rank's own
    torch.Generators (each rank saves its own).
    """
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()

    if is_deepspeed(accelerator):
        accelerator.save_state(str(tmp), exclude_frozen_parameters=True)  # all ranks
    else:
        if accelerator.is_main_process:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / f"rng_state_{accelerator.process_index}.pt")
    if accelerator.is_main_process:  # the scheduler stays out of accelerate.prepare (train.loop.optimizer_step)
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    if generators:
        torch.save({k: g.get_state() for k, g in generators.items()}, tmp / f"generators_{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        save_model(tmp)
        if config is not None:
            save_config(config, tmp / "config.yaml")
        write_json_atomic(tmp / STATE_NAME, {**trainer_state, "step": step})
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        if final.exists():  # re-saving the same step (e.g. the final save after a periodic one)
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune_checkpoints(output_dir, keep_last, keep_steps)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, ckpt_dir: str | Path, *, load_model: Callable[[Path], None],
                    optimizer, scheduler, generators: dict[str, torch.Generator] | None = None) -> dict:
    """Restore a checkpoint written by `save_checkpoint` (after `accelerator.prepare`); returns
    its trainer_state. Call on every rank."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / STATE_NAME).is_file():
        raise FileNotFoundError(f"{str(ckpt_dir)!r} is not a complete checkpoint (no {STATE_NAME})")
    if is_deepspeed(accelerator):
        accelerator.load_state(str(ckpt_dir), load_module_strict=False)
    else:
        load_model(ckpt_dir)
        optimizer.load_state_dict(torch.load(ckpt_dir / "optimizer.pt", map_location="cpu", weights_only=False))
        rng_file = ckpt_dir / f"rng_state_{accelerator.process_index}.pt"
        if not rng_file.is_file():
            raise FileNotFoundError(f"{str(rng_file)!r} is missing: the checkpoint was written by a run with "
                                    "fewer processes; resume with the same number of processes")
        set_rng_state(torch.load(rng_file, weights_only=False))
    scheduler.load_state_dict(torch.load(ckpt_dir / "scheduler.pt", map_location="cpu", weights_only=False))
    if generators:
        gen_file = ckpt_dir / f"generators_{accelerator.process_index}.pt"
        saved = torch.load(gen_file, weights_only=False) if gen_file.is_file() else {}
        missing = sorted(set(generators) - set(saved))
        if missing:
            raise FileNotFoundError(f"{str(gen_file)!r} holds no state for the generator(s) {missing}: the checkpoint "
                                    "was written by a different recipe or number of processes")
        for k, g in generators.items():
            g.set_state(saved[k])
    return json.loads((ckpt_dir / STATE_NAME).read_text())


# ---- resuming under a changed config ------------------------------------------------------------

def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def resume_changes(ckpt_dir: str | Path, config, fixed: tuple[str, ...]) -> dict[str, tuple]:
    """Compare this run's config with the one saved in the checkpoint. A changed key under one of `fixed`
    (model, data, objective, ...) is an error: the result would be neither run. Every other change is
    returned, {dotted key: (saved, now)}, for the recipe to apply (`apply_optimizer_settings`) and log."""
    import yaml
    from d2f.yaml_config import ConfigError, to_dict
    saved_file = Path(ckpt_dir) / "config.yaml"
    if not saved_file.is_file():
        return {}
    saved, now = _flatten(yaml.safe_load(saved_file.read_text()) or {}), _flatten(to_dict(config))
    # keys one side lacks are settings added (at their default) or removed since the checkpoint was written
    changed = {k: (saved[k], now[k]) for k in sorted(set(saved) & set(now)) if saved[k] != now[k]}
    bad = {k: v for k, v in changed.items() if k.split(".")[0] in fixed}
    if bad:
        what = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in bad.items())
        raise ConfigError(f"cannot resume {str(ckpt_dir)!r} with a different setup ({what}): the result would be "
                          "neither run. Keep those settings, or start a new run in a new output_dir "
                          "(init_from the checkpoint where the recipe has it)")
    return changed


def apply_optimizer_settings(optimizer, scheduler, lr: float, weight_decays: list[float], **group_settings) -> None:
    """After restoring a checkpoint: this run's lr, weight decay, betas, eps (which the restored
    optimizer and scheduler states would otherwise override) in every parameter group and in the
    schedule, so a changed setting applies everywhere from the next step on."""
    groups = optimizer.param_groups
    for g, wd in zip(groups, weight_decays):
        g["weight_decay"] = wd
        g.update(group_settings)
    scheduler.base_lrs = [lr] * len(groups)
    last = [lr * fn(scheduler.last_epoch) for fn in scheduler.lr_lambdas]
    for g, v in zip(groups, last):
        g["lr"] = v
    scheduler._last_lr = last


def truncate_metrics(path: str | Path, step: int) -> None:
    """Keep the lines of a metrics.jsonl up to `step` (a resumed run redoes the steps after its
    checkpoint), so the file stays one line per step."""
    path = Path(path)
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
