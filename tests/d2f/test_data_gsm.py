"""The testbed problem generator: format, determinism, disjoint splits, number ranges, variety."""
import re

import pytest

from d2f.data.gsm import TEMPLATES, annotate, make_problems, split_of

pytestmark = pytest.mark.filterwarnings("ignore")


def test_same_arguments_same_problems():
    assert make_problems("train", 200, seed=3) == make_problems("train", 200, seed=3)
    assert make_problems("test", 50) == make_problems("test", 50, seed=0)
    assert make_problems("train", 50, seed=1) != make_problems("train", 50, seed=2)


def test_prefix_stable():
    assert make_problems("test", 30) == make_problems("test", 100)[:30]


def test_splits_disjoint_by_construction():
    train = make_problems("train", 5000)
    test = make_problems("test", 500)
    train_q = {p["question"] for p in train}
    test_q = {p["question"] for p in test}
    assert len(train_q) == 5000 and len(test_q) == 500  # distinct within a split
    assert not train_q & test_q
    assert all(split_of(q) == "train" for q in train_q)
    assert all(split_of(q) == "test" for q in test_q)


def test_gsm8k_format_and_arithmetic():
    step = re.compile(r"<<([\d+\-*/]+)=(\d+)>>(\d+)")
    for p in make_problems("test", 300, seed=5):
        assert set(p) == {"question", "answer", "final"}
        assert p["question"].endswith("?")
        lines = p["answer"].split("\n")
        assert lines[-1] == f"#### {p['final']}"
        assert 2 <= len(lines) - 1 <= 4  # 2-4 working steps
        for line in lines[:-1]:
            calcs = step.findall(line)
            assert calcs, line  # every working line does one operation, annotated as in GSM8K
            for expr, res, shown in calcs:
                assert eval(expr) == int(res) == int(shown)
                assert int(res) < 200
        assert 0 <= int(p["final"]) < 200
        # the final answer is the result of the last working line
        assert step.findall(lines[-2])[-1][1] == p["final"]


def test_variety():
    ps = make_problems("train", 3000)
    openings = {p["question"].split(" ")[0] for p in ps}
    assert len(openings) > 40  # names and template openings vary
    finals = {p["final"] for p in ps}
    assert len(finals) > 120
    assert len(TEMPLATES) >= 20


def test_annotate_checks_the_arithmetic():
    assert annotate("So 98 - 54 = 44 chairs.") == "So 98 - 54 = <<98-54=44>>44 chairs."
    assert annotate("They pay 3 * 4 = $12.") == "They pay 3 * 4 = $<<3*4=12>>12."
    with pytest.raises(AssertionError):
        annotate("2 + 2 = 5")


def test_bad_arguments():
    with pytest.raises(ValueError, match="split 'dev'"):
        make_problems("dev", 3)
    with pytest.raises(ValueError, match="n must be"):
        make_problems("train", -1)
