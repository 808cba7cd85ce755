"""scripts/teacher_horizon.py: hiding the keys after the current block is the same as cutting the sequence
there; with every block visible it is plain vanilla decoding, answer for answer; cut to the current block the
testbed teacher decodes differently (its figures on the 500 problems are in testbed/student/README.md)."""
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import teacher_horizon  # noqa: E402

# the first 4 held-out problems, gen 48: which answers the cut leaves as they were (problem 0 then reads
# "5 paid $10,, so the change" where plain decoding reads "Hugo paid $50, so the change")
SAME_WHEN_CUT = [False, True, True, True]


@pytest.fixture(scope="module")
def teacher():
    from infer.api import load
    return load(None, "vanilla")


def test_hidden_keys_equal_a_cut_sequence(teacher):
    model, tok = teacher
    from d2f.data.tokenizer import prompt_ids
    mask_id = model.config.mask_token_id
    prompt = prompt_ids(tok, "Mia has 12 apples. She buys 5 more. How many apples does she have now?")
    P, G, bs = len(prompt), 64, 16
    answer = tok("Mia has 12 + 5 = <<12+5=17>>17 apples.", add_special_tokens=False)["input_ids"][:20]
    x = torch.tensor([prompt + answer + [mask_id] * (G - len(answer))])  # current block: the second (slots 16-31)
    for extra in (0, 1):
        end = P + (2 + extra) * bs
        with torch.no_grad():
            hidden = teacher_horizon.Horizon(model, bs, G, extra)(x)[:, :end]
            cut = model(x[:, :end])
        torch.testing.assert_close(hidden, cut, rtol=1e-4, atol=1e-4)


def test_every_block_visible_is_plain_vanilla_and_the_cut_changes_answers(teacher, tmp_path):
    from infer.api import DecodeConfig, generate
    from infer.eval import PREDICTIONS, load_problems, make_prompts, read_predictions
    model, tok = teacher
    problems = load_problems("testbed", "test", 4)
    cfg = DecodeConfig(mode="vanilla", max_new_tokens=48, block_size=16, steps=48)
    plain = [r.text for r in generate(model, tok, make_prompts(tok, problems, shots=0, source="testbed"), cfg)]

    def outputs(extra: int) -> list[str]:
        out = tmp_path / f"extra-{extra}"
        summary = teacher_horizon.main(["--limit", "4", "--max-new-tokens", "48", "--batch-size", "4", "--no-progress",
                                        "--extra-blocks", str(extra), "--output-dir", str(out)])
        assert summary["n"] == 4 and summary["nfe_mean"] == 48
        return [r["output"] for _, r in sorted(read_predictions(out / PREDICTIONS).items())]

    assert outputs(2) == plain  # the current block + 2 later ones: all 3 blocks
    assert [a == b for a, b in zip(outputs(0), plain)] == SAME_WHEN_CUT


@pytest.mark.parametrize("argv, msg", [
    (["--extra-blocks", "-1"], "--extra-blocks -1 is negative"),
    (["--block-size", "24"], "--block-size 24 does not divide --max-new-tokens 128"),
])
def test_bad_arguments_one_line(argv, msg, tmp_path):
    from d2f.errors import UserError
    with pytest.raises(UserError) as e:
        teacher_horizon.main(argv + ["--output-dir", str(tmp_path)])
    assert msg in str(e.value) and "\n" not in str(e.value)
