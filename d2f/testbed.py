"""Where the embedded testbed lives: tokenizer, teacher (dLLM), AR baseline, D2F student adapter.

The artefacts are shipped in the repo under `testbed/` and rebuilt from scratch by
`scripts/build_testbed.sh`; everything here only points at them.
"""
from __future__ import annotations

import os
from pathlib import Path

from d2f.errors import UserError

TESTBED_DIR = Path(os.environ.get("D2F_TESTBED", Path(__file__).resolve().parents[1] / "testbed"))
ROLES = ("teacher", "ar", "student")


class TestbedMissing(UserError, FileNotFoundError):
    pass


def role_for_mode(mode: str) -> str:
    """The testbed model a decoding mode uses by default: the teacher for vanilla and Fast-dLLM, the
    student (teacher + D2F adapter) for d2f, the AR baseline for ar."""
    return {"d2f": "student", "ar": "ar"}.get(mode, "teacher")


def _existing(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise TestbedMissing(f"the testbed {what} is not at {str(path)!r}. Rebuild it with "
                             "`bash scripts/build_testbed.sh` or pass --model/--tokenizer explicitly.")
    return path


def tokenizer_path() -> Path:
    return _existing(TESTBED_DIR / "tokenizer", "tokenizer")


def model_path(role: str) -> Path:
    if role not in ROLES:
        raise ValueError(f"unknown testbed role {role!r}; expected one of {ROLES}")
    return _existing(TESTBED_DIR / role, f"{role} model")
