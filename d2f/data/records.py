"""Reading the user's data files: one reader for every .jsonl a command takes (training data, evaluation
sets, prompt files), so each bad file gets the same one-line error naming the file and the line.

    read_jsonl("answers.jsonl")                      # [dict], one JSON object per line
    read_records("answers.jsonl") / ("org/dataset")  # a local .jsonl, else a hub data set
    resolve_fields(records, source, None, None)      # ("question", "answer"): which fields hold what
    resolve_fields(records, source, None, None, need_answer=False)  # ("question", None): prompts only
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from d2f.errors import UserError
from d2f.yaml_config import ConfigError

# the field names tried, in order, when the user names none
PROMPT_FIELDS, ANSWER_FIELDS = ("prompt", "question"), ("answer", "response")


def read_jsonl(path: str | Path, what: str = "data file", limit: int | None = None) -> list[dict]:
    """The JSON objects of a UTF-8 file, one per line (blank lines skipped), at most `limit` of them.
    `what` names the file in errors ("--input-file", "data file", ...)."""
    rows = []
    for _, row in numbered_jsonl(path, what):
        if limit is not None and len(rows) >= limit:
            break
        rows.append(row)
    return rows


def numbered_jsonl(path: str | Path, what: str = "data file") -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line, so a caller's own check can name the line."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise UserError(f"{what} {str(path)!r} is a directory; pass a .jsonl file (one JSON object per line)")
    if not p.is_file():
        raise UserError(f"{what} {str(path)!r} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not a JSON line ({e.msg}); each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{n}: a JSON {type(row).__name__}, expected an object")
        yield n, row


def read_records(source: str, split: str = "train", limit: int | None = None) -> list[dict]:
    """A local .jsonl file (read_jsonl) or a hub data set (`datasets.load_dataset(source, split=split)`)."""
    if source.endswith(".jsonl") or Path(source).expanduser().is_file():
        records = read_jsonl(source, "data file", limit)
    else:
        import datasets
        ds = datasets.load_dataset(source, split=split)
        records = [dict(r) for r in (ds.select(range(min(limit, len(ds)))) if limit is not None else ds)]
    if not records:
        raise ConfigError(f"data source {source!r} holds no records")
    return records


def resolve_fields(records: list[dict], source: str, prompt_field: str | None,
                   answer_field: str | None, need_answer: bool = True,
                   set_hint: str = "data.{}_field") -> tuple[str, str | None]:
    """Which fields hold the prompt and the answer (the given names, else the first of PROMPT_FIELDS /
    ANSWER_FIELDS present), checked on every record; ("prompt_ids", "answer_ids") for pre-tokenized data.
    need_answer=False: prompts only (the answer comes back None). `set_hint` names the setting that picks a
    field, for the error ("--{}-field" on a command line). Errors are ConfigErrors: the fix is a setting."""
    first = records[0]
    if "prompt_ids" in first and prompt_field is None and answer_field is None and (
            "answer_ids" in first or not need_answer):
        return "prompt_ids", "answer_ids" if need_answer else None
    out = []
    wanted = ((prompt_field, PROMPT_FIELDS, "prompt"), (answer_field, ANSWER_FIELDS, "answer"))
    for given, candidates, what in wanted[:2 if need_answer else 1]:
        options = (given,) if given else candidates
        name = next((c for c in options if c in first), None)
        if name is None:
            raise ConfigError(f"data source {source!r} has no {what} field: expected one of "
                              f"{list(options)} (set {set_hint.format(what)}), records have {sorted(first)}")
        out.append(name)
    for i, r in enumerate(records):
        missing = [f for f in out if f not in r or r[f] is None]
        if missing:
            raise ConfigError(f"record {i} of {source!r} lacks field(s) {missing}")
    return out[0], out[1] if need_answer else None
