"""scripts/result_accuracy.py: the calculator results it finds (train.objectives.result_spans, which the
teacher's result states use too), and its rows on the first 20 held-out problems (the shipped testbed
models; the 500-problem figures are in testbed/student/README.md)."""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import result_accuracy  # noqa: E402

# the rows on the first 20 held-out problems with the shipped teacher and student
TWENTY = {"results": 54, "teacher, full attention": 50,
          "teacher, full attention, cut at the end of the result's block": 47,
          "teacher, full attention, cut one block later": 50, "student, block-causal": 49,
          "teacher's weights, block-causal (no adapter)": 44}


def test_result_spans_are_the_numbers_after_a_bare_equals_sign():
    from d2f.data.tokenizer import load_tokenizer, prompt_ids
    from train.objectives import number_spans, result_spans
    tok = load_tokenizer(str(REPO / "testbed" / "tokenizer"))
    vocab_text = [tok.decode([i]) for i in range(len(tok))]
    answer = "The hats cost 2 * 11 = $<<2*11=22>>22 in total.\nSo the change is 50 - 22 = $<<50-22=28>>28.\n#### 28"
    prompt = prompt_ids(tok, "Sofia buys 2 hats for $11 each.")
    row = prompt + tok(answer, add_special_tokens=False)["input_ids"]
    spans = result_spans([sp for sp in number_spans(row, vocab_text) if sp[0] >= len(prompt)], row, vocab_text)
    assert [tok.decode(row[s:e]) for s, e, _ in spans] == ["22", "28"]
    assert all(tok.decode(row[s - 1:s]) == "=" for s, _, _ in spans)


def test_result_accuracy_rows_on_twenty_problems(capsys):
    out = result_accuracy.main(["--limit", "20"])
    assert out == TWENTY
    assert "| student, block-causal | 90.7% (49/54) |" in capsys.readouterr().out


def test_a_model_given_without_an_adapter_has_no_student_row(capsys):
    """A teacher not yet distilled: its rows alone (before, the "student" row silently decoded the teacher's
    weights without an adapter, the last row again)."""
    out = result_accuracy.main(["--limit", "20", "--model", str(REPO / "testbed" / "teacher")])
    assert out == {k: v for k, v in TWENTY.items() if k != "student, block-causal"}
    assert "student" not in capsys.readouterr().out
