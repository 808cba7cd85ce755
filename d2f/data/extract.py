"""Read the final number out of a GSM8K-style answer and compare it with the gold one.

    extract_answer("... so she has 5 + 2 = <<5+2=7>>7 apples.\\n#### 7")  -> "7"
    extract_answer("The answer is $1,250.00.")                            -> "1250"
    is_correct("#### 7.0", "7")                                           -> True

Rule (the usual GSM8K one): the number after the first `####` if there is one, else the last number in
the text. Commas and `$` are removed, and numbers are normalised so "7.0", "7.00" and "07" all read "7".
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

NUMBER = re.compile(r"-?\$?\s?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+")
HASHES = re.compile(r"####\s*([^\n]*)")


def normalize_number(s: str) -> str | None:
    """"$1,250.00" -> "1250", "-3.50" -> "-3.5", "abc" -> None."""
    s = s.replace(",", "").replace("$", "").replace(" ", "").strip().rstrip(".")
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def extract_answer(text: str) -> str | None:
    """The normalised final number of a GSM8K-style answer, or None when there is no number."""
    if text is None:
        return None
    m = HASHES.search(text)
    if m:
        nums = NUMBER.findall(m.group(1))
        if nums:
            return normalize_number(nums[0])
    nums = NUMBER.findall(text)
    for candidate in reversed(nums):
        value = normalize_number(candidate)
        if value is not None:
            return value
    return None


def is_correct(text: str, gold: str) -> bool:
    """Whether the answer extracted from `text` equals the gold answer (both normalised)."""
    pred = extract_answer(text)
    want = normalize_number(str(gold)) if normalize_number(str(gold)) is not None else extract_answer(str(gold))
    return pred is not None and want is not None and pred == want
