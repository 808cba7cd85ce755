"""Final-answer extraction on GSM8K-style strings and the loaders of evaluation sets."""
import json

import pytest

from d2f.data.extract import extract_answer, is_correct, normalize_number
from d2f.data.gsm import split_of
from d2f.data.gsm8k import load_gsm8k

DEV_FIRST = "Paul collects 20 stickers on Monday and 11 stickers on Thursday."


@pytest.mark.parametrize("text, want", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72", "72"),
    ("Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n#### 10", "10"),
    ("#### 1,250", "1250"),
    ("#### $18.00", "18"),
    ("#### 7.0", "7"),
    ("#### -3", "-3"),
    ("#### 2.50", "2.5"),
    ("#### 12\n#### 99", "12"),  # the first #### wins
    ("So the answer is 5 apples, then 17.", "17"),  # no ####: the last number
    ("The total is $1,234.", "1234"),
    ("It costs .5 dollars", "0.5"),
    ("I don't know.", None),
    ("", None),
    ("#### none\nbut 42 was computed", "42"),
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_is_correct():
    assert is_correct("... = <<3+4=7>>7 apples.\n#### 7", "7")
    assert is_correct("#### 7.00", "7")
    assert is_correct("#### 1,000", "1000")
    assert is_correct("The answer is 18", "$18")
    assert not is_correct("#### 8", "7")
    assert not is_correct("no number here", "7")
    assert not is_correct("#### 70", "7")


def test_normalize_number():
    assert normalize_number("$1,250.00") == "1250"
    assert normalize_number("-3.50") == "-3.5"
    assert normalize_number("07") == "7"
    assert normalize_number("abc") is None


def test_load_testbed():
    rows = load_gsm8k("testbed")
    assert len(rows) == 500
    assert load_gsm8k("testbed", limit=10) == rows[:10]
    assert all(is_correct(r["answer"], r["final"]) for r in rows)


def test_testbed_dev_split_is_held_out_and_apart_from_test():
    dev, test = load_gsm8k("testbed", split="dev"), load_gsm8k("testbed")
    questions = {r["question"] for r in dev}
    assert len(dev) == len(questions) == 500
    assert not questions & {r["question"] for r in test}
    assert all(split_of(q) == "test" for q in questions)  # never a question the testbed models trained on
    assert all(is_correct(r["answer"], r["final"]) for r in dev)
    assert load_gsm8k("testbed", split="dev", limit=7) == dev[:7]
    assert dev[0]["question"].startswith(DEV_FIRST)  # the same problems on every machine


def test_load_real100():
    rows = load_gsm8k("real100")
    assert len(rows) == 100
    assert len({r["question"] for r in rows}) == 100
    assert all(r["answer"].rstrip().splitlines()[-1].startswith("####") for r in rows)
    assert all(is_correct(r["answer"], r["final"]) for r in rows)
    assert load_gsm8k("real100", limit=3) == rows[:3]


def test_load_local_jsonl(tmp_path):
    p = tmp_path / "mine.jsonl"
    p.write_text("\n".join(json.dumps({"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"})
                           for i in range(4)))
    rows = load_gsm8k(str(p))
    assert [r["final"] for r in rows] == ["1", "2", "3", "4"]


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="real100"):
        load_gsm8k("no/such/file.jsonl")
    with pytest.raises(ValueError, match="split"):
        load_gsm8k("testbed", split="validation")
    with pytest.raises(ValueError, match="only for source 'testbed'"):
        load_gsm8k("real100", split="dev")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"q": "x"}) + "\n")
    with pytest.raises(ValueError, match="no 'question'"):
        load_gsm8k(str(bad))
