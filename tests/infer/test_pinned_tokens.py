"""The exact tokens and NFE every mode decodes on the shipped testbed models, pinned.

Refactors of the model, the attention backends, the caches or the decoders must not change a single
token; this test fails if they do. When the shipped models themselves change (scripts/build_testbed.sh),
regenerate the pinned file on purpose and say so in the commit:

    python tests/infer/test_pinned_tokens.py        # rewrites tests/infer/pinned_tokens.json
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from infer.bench import MODES

PINNED = Path(__file__).with_name("pinned_tokens.json")
N_PROBLEMS = 2  # decoded together, batch 2 (padding and per-row bookkeeping are exercised too)


def decode_all() -> dict:
    """{mode name: [{"tokens": [...], "nfe": n}, ...]} for every mode of `infer.bench.MODES`."""
    from d2f.data.gsm8k import load_gsm8k
    from d2f.data.tokenizer import prompt_ids
    from infer.api import DecodeConfig, generate, load

    problems = load_gsm8k("testbed", split="test", limit=N_PROBLEMS)
    out = {}
    for name in sorted(MODES):
        cfg = DecodeConfig(**MODES[name])
        model, tok = load(None, cfg.mode)
        prompts = [prompt_ids(tok, p["question"]) for p in problems]
        results = generate(model, tok, prompts, cfg, batch_size=N_PROBLEMS)
        out[name] = [{"tokens": r.token_ids, "nfe": r.nfe} for r in results]
    return out


@pytest.fixture(scope="module")
def decoded() -> dict:
    return decode_all()


def test_pinned_file_covers_every_mode(decoded):
    assert sorted(json.loads(PINNED.read_text())) == sorted(decoded)


@pytest.mark.parametrize("name", sorted(MODES))
def test_same_tokens_as_pinned(decoded, name):
    pinned = json.loads(PINNED.read_text())[name]
    got = decoded[name]
    for i, (p, g) in enumerate(zip(pinned, got, strict=True)):
        assert g["tokens"] == p["tokens"], f"{name}: problem {i} decodes to other tokens than pinned"
        assert g["nfe"] == p["nfe"], f"{name}: problem {i} NFE {g['nfe']} != pinned {p['nfe']}"
    assert all(len(p["tokens"]) > 10 for p in pinned), "pinned answers are too short to mean anything"


if __name__ == "__main__":
    PINNED.write_text(json.dumps(decode_all(), indent=None) + "\n")
    print(f"wrote {PINNED}")
