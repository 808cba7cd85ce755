"""The testbed tokenizer: exact round trips, single-digit numbers, special tokens, chat template."""
from pathlib import Path

import pytest

from d2f.data.gsm import make_problems
from d2f.data.tokenizer import (ASSISTANT, EOS, MASK, PAD, USER, load_tokenizer, prompt_ids, train_tokenizer)

SHIPPED = Path(__file__).resolve().parents[2] / "testbed" / "tokenizer"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A small tokenizer trained here, saved and reloaded (the save/load path is part of the test)."""
    ps = make_problems("train", 300, seed=1)
    t = train_tokenizer([p["question"] for p in ps] + [p["answer"] for p in ps], vocab_size=400)
    d = tmp_path_factory.mktemp("tok")
    t.save_pretrained(str(d))
    return load_tokenizer(d)


def test_round_trip(tok):
    texts = [p["question"] + "\n" + p["answer"] for p in make_problems("test", 50)]
    texts += ["Zoë paid $1,234.50 — ünïcode & symbols {}[]!\n\ttabs", "  leading spaces", ""]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text


def test_digits_are_single_tokens(tok):
    ids = tok("The answer is 123456, <<12+7=19>>19.", add_special_tokens=False)["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    # one digit per token; a digit after a space carries the space ("Ġ1"), as words do
    assert [p for p in pieces if any(ch.isdigit() for ch in p)] == ["Ġ1"] + list("23456") + list("127191") + list("9")


def test_special_tokens(tok):
    assert tok.convert_ids_to_tokens([0, 1, 2]) == [PAD, EOS, MASK]
    assert (tok.pad_token_id, tok.eos_token_id, tok.mask_token_id) == (0, 1, 2)
    assert tok.pad_token == PAD and tok.eos_token == EOS and tok.mask_token == MASK
    # special tokens are atomic in text and dropped by skip_special_tokens
    ids = tok(f"a{MASK}{MASK}b{EOS}", add_special_tokens=False)["input_ids"]
    assert ids.count(2) == 2 and ids.count(1) == 1
    assert tok.decode(ids, skip_special_tokens=True) == "ab"
    assert tok.decode(ids) == f"a{MASK}{MASK}b{EOS}"


def test_chat_template(tok):
    q, a = "What is 2 + 3?", "2 + 3 = <<2+3=5>>5\n#### 5"
    text = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
    assert text == f"{USER}\n{q}\n{ASSISTANT}\n"
    full = tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                   tokenize=False)
    assert full == f"{USER}\n{q}\n{ASSISTANT}\n{a}{EOS}\n"
    ids = prompt_ids(tok, q)
    assert tok.decode(ids) == text
    assert ids[0] == tok.convert_tokens_to_ids(USER)
    assert tok.convert_tokens_to_ids(ASSISTANT) in ids


def test_too_small_vocab():
    with pytest.raises(ValueError, match="vocab_size 100"):
        train_tokenizer(["a b c"], vocab_size=100)


def test_missing_tokenizer_dir(tmp_path):
    from d2f.errors import UserError
    with pytest.raises(UserError, match="has no tokenizer.json; build the testbed tokenizer"):
        load_tokenizer(tmp_path)


@pytest.mark.skipif(not (SHIPPED / "tokenizer.json").is_file(), reason="testbed tokenizer not built")
def test_shipped_tokenizer():
    t = load_tokenizer(SHIPPED)
    assert len(t) == 1024
    assert (t.pad_token_id, t.eos_token_id, t.mask_token_id) == (0, 1, 2)
    p = make_problems("test", 1)[0]
    assert t.decode(t(p["answer"], add_special_tokens=False)["input_ids"]) == p["answer"]
    assert t.decode(prompt_ids(t, p["question"])) == f"{USER}\n{p['question']}\n{ASSISTANT}\n"
