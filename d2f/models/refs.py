"""What a model, tokenizer or adapter string names, decided in one place.

Every command and the Python API take the same strings (`--model`, `--tokenizer`, `--adapter`, a
recipe's `model.base` / `model.tokenizer`, a compare row's `model`):

- a preset name, `d2f.models.PRESETS` (models only);
- a local directory: any string naming a path that exists;
- a hub id, `owner/name`, for anything else shaped like one.

A string that is none of these is refused at once with its name (a typo in a local path is never sent
to the hub, where it would fail minutes later as a network error).

    check("model", "runs/teacher")                  # a UserError naming it when it is not usable
    is_ours("GSAI-ML/LLaDA-8B-Instruct")            # our LLaDA / Dream classes, or transformers'?
    own_tokenizer("runs/teacher")                   # where that checkpoint's tokenizer is, if anywhere
    tok = load_tokenizer("testbed/tokenizer")       # the one tokenizer loader
"""
from __future__ import annotations

import re
from pathlib import Path

from d2f.errors import UserError

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def looks_like_hub_id(ref: str) -> bool:
    return bool(HUB_ID.fullmatch(ref)) and not ref.startswith((".", "/", "~"))


def problem(what: str, ref: str | None, name: str | None = None) -> str | None:
    """Why `ref` cannot name a `what` ("model", "checkpoint" (a model but not a preset), "tokenizer" or
    "adapter"), or None when it can. `name`: how the user set it, for the message ("--model",
    "model.base"; default: `what`)."""
    from d2f.models import PRESETS
    name = name or what
    if ref is None or (what == "model" and ref in PRESETS):
        return None
    p = Path(ref).expanduser()
    if p.is_dir():
        if what in ("model", "checkpoint") and not (p / "config.json").is_file():
            return f"{name} {ref!r} has no config.json: pass a checkpoint directory (config.json + *.safetensors)"
        return None
    if p.exists():
        return f"{name} {ref!r} is a file; pass the directory that holds it"
    if not looks_like_hub_id(ref):
        hint = f", a preset ({', '.join(PRESETS)})" if what == "model" else ""
        return (f"{name} {ref!r} does not exist: it is neither a local directory{hint} nor a hub id (owner/name); "
                "check the path")
    return None


def check(what: str, ref: str | None, error: type[UserError] = UserError, name: str | None = None) -> None:
    """Raise `error` when `ref` cannot name a `what` (see `problem`)."""
    msg = problem(what, ref, name)
    if msg is not None:
        raise error(msg)


def is_ours(ref: str) -> bool:
    """A preset, a local checkpoint whose config.json says llada / Dream, or a hub id naming LLaDA or Dream:
    loaded by our classes (`d2f.models.load_model`); anything else goes to transformers."""
    from d2f.models import PRESETS
    if ref in PRESETS:
        return True
    p = Path(ref).expanduser()
    if (p / "config.json").is_file():
        from d2f.models.io import read_json
        return str(read_json(p / "config.json", "config").get("model_type", "")).lower() in ("llada", "dream")
    return any(k in ref.lower() for k in ("llada", "dream"))


def has_tokenizer(path: str | Path) -> bool:
    p = Path(path).expanduser()
    return any((p / f).is_file() for f in TOKENIZER_FILES)


def own_tokenizer(model: str) -> str | None:
    """Where the checkpoint `model` keeps its tokenizer: a preset's hub id (None for the random tiny
    presets), the directory itself when it holds tokenizer files, a hub id itself; else None."""
    from d2f.models import PRESETS
    if model in PRESETS:
        return PRESETS[model][0]
    p = Path(model).expanduser()
    if p.is_dir():
        return str(p) if has_tokenizer(p) else None
    return model if looks_like_hub_id(model) else None


def load_tokenizer(ref: str | Path, error: type[UserError] = UserError,
                   fix: str = "pass a directory holding tokenizer.json (or a hub id reachable here)"):
    """AutoTokenizer.from_pretrained(ref), with every failure one line naming `ref` and `fix`."""
    from transformers import AutoTokenizer
    from transformers.utils import logging
    p = Path(ref).expanduser()
    if p.is_dir() and not has_tokenizer(p):
        raise error(f"cannot load the tokenizer {str(ref)!r}: the directory has no tokenizer.json; {fix}")
    # a tokenizer saved beside one of our checkpoints sits next to a config.json whose model_type (llada)
    # transformers does not know; it warns about that config, which says nothing about the tokenizer
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(str(ref))
    except (OSError, ValueError, KeyError) as e:  # missing / broken tokenizer files, offline hub
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise error(f"cannot load the tokenizer {str(ref)!r} ({type(e).__name__}: {first}); {fix}") from None
    finally:
        logging.set_verbosity(level)
