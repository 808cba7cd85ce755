"""The student's own decoding states (train/student_states.py): the recorded states are the D2F decoder's
buffers before each forward, their loss positions the masked slots of the blocks that forward decoded, and
the sampler lays them out as the recipe's sequences."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "infer"))

from helpers import random_model  # noqa: E402
from infer.api import DecodeConfig  # noqa: E402
from infer.batch import make_batch  # noqa: E402
from infer.d2f_decoder import decode  # noqa: E402
from infer.steps import StepLog  # noqa: E402
from d2f.yaml_config import ConfigError  # noqa: E402
from train.student_states import StudentStates, load_student_states, record_states  # noqa: E402

GEN, BLOCK = 32, 8
TAUS = dict(tau_add=0.5, tau_act=0.8, tau_conf=0.3)  # low thresholds: several blocks in flight, parallel commits


def engine_buffers(model, prompts):
    """Per sample, the answer buffer after each of its forwards, from an uncompacted decode (rows stay put)."""
    cfg = DecodeConfig(mode="d2f", max_new_tokens=GEN, block_size=BLOCK, **TAUS)
    batch = make_batch(prompts, GEN, model.config.mask_token_id, model.config.pad_token_id)
    after = [[] for _ in prompts]

    def snap(ev):
        for row, a in enumerate(ev["active"].tolist()):
            if a:
                after[row].append(ev["answer"][row].clone())
    decode(model, batch, cfg, StepLog(len(prompts), on_step=snap), compact=False)
    return after


@pytest.fixture(scope="module")
def recorded():
    model = random_model("tiny-llada", seed=5, std=0.5)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 100, (n,), generator=g).tolist() for n in (5, 9, 7, 6)]  # unequal: left padding
    cfg = DecodeConfig(mode="d2f", max_new_tokens=GEN, block_size=BLOCK, **TAUS)
    d = record_states(model, prompts, cfg, batch_size=3)  # two batches, compacted rows
    return model, prompts, d


def test_states_are_the_decoders_buffers_before_each_forward(recorded):
    model, prompts, d = recorded
    mask = model.config.mask_token_id
    after = engine_buffers(model, prompts)
    states = StudentStates(d, mask, length=48, block_size=BLOCK)
    assert [len(a) for a in after] == d["nfe"].tolist()
    assert max(d["nfe"]) > 2 and int((d["in_flight"].sum(-1) > 1).sum()) > 0  # pipelined: blocks overlap
    for i, buffers in enumerate(after):
        assert torch.equal(d["answers"][i], buffers[-1])  # the decoder's final answer
        for t in range(len(buffers)):
            x, plen, key_valid, loss_at = states.state(torch.tensor([i]), torch.tensor([t]))
            P = len(prompts[i])
            before = torch.full((GEN,), mask) if t == 0 else buffers[t - 1]
            assert torch.equal(x[0, P:P + GEN], before), (i, t)
            assert x[0, :P].tolist() == prompts[i] and int(plen[0]) == P
            assert key_valid[0].tolist() == [True] * (P + GEN) + [False] * (48 - P - GEN)
            # forward t commits only masked slots of the blocks it decoded, and those are the loss positions
            committed = (before == mask) & (buffers[t] != mask)
            assert committed.any()
            at = loss_at[0, P:P + GEN]
            assert not (committed & ~at).any(), (i, t)
            flight = d["in_flight"][i, t].repeat_interleave(BLOCK)
            assert torch.equal(at, (before == mask) & flight)


def test_sampler_layout_and_bad_files(recorded, tmp_path):
    model, prompts, d = recorded
    mask = model.config.mask_token_id
    states = StudentStates(d, mask, length=GEN + 7, block_size=BLOCK, vocab=128)  # the 9-token prompt does not fit
    assert states.dropped == 1 and len(states) == 3
    x, plen, key_valid, loss_at = states.sample(16, torch.Generator().manual_seed(0))
    assert x.shape == (16, GEN + 7) and set(plen.tolist()) <= {5, 7, 6}
    assert not (loss_at & ~key_valid).any() and loss_at.any()
    assert ((x == mask) | ~loss_at).all()  # every loss position is masked in the input
    with pytest.raises(ConfigError, match="recorded with block size 8, but noise.block_size is 16"):
        StudentStates(d, mask, length=64, block_size=16)
    with pytest.raises(ConfigError, match="no recorded state fits data.max_length=20"):
        StudentStates(d, mask, length=20, block_size=BLOCK)
    with pytest.raises(ConfigError, match=r"not an id of the model's vocabulary \[0, 50\)"):
        StudentStates(d, mask, length=64, block_size=BLOCK, vocab=50)
    with pytest.raises(ConfigError, match="does not exist; write it with `python train/student_states.py"):
        load_student_states(tmp_path / "none.pt")
    torch.save({"answers": 1}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="is not a student states file"):
        load_student_states(tmp_path / "other.pt")


def test_records_from_prompts_alone(tmp_path):
    """The recorder needs prompts only (the student writes the answers): a prompt-only .jsonl is enough,
    and a file without a prompt field names the flag that picks one."""
    from d2f.data.tokenizer import prompt_ids
    from infer.api import load
    from train.student_states import main

    questions = ["Ana has 3 pens. She buys 4 more. How many pens does she have?",
                 "A box holds 5 apples. How many apples are in 2 boxes?"]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"question": q}) + "\n" for q in questions))
    out = main(["--model", "testbed/teacher", "--adapter", "testbed/student", "--data", str(data),
                "--max-new-tokens", "32", "--out", str(tmp_path / "s.pt")])
    _, tok = load("testbed/teacher", mode="d2f")
    assert out["prompts"] == [prompt_ids(tok, q, True) for q in questions]
    assert out["answers"].shape == (2, 32) and out["nfe"].min() >= 2
    assert load_student_states(tmp_path / "s.pt")["prompts"] == out["prompts"]
    (tmp_path / "bad.jsonl").write_text('{"text": "hello"}\n')
    with pytest.raises(ConfigError, match=r"has no prompt field.*\(set --prompt-field\)"):
        main(["--model", "testbed/teacher", "--adapter", "testbed/student", "--data", str(tmp_path / "bad.jsonl"),
              "--out", str(tmp_path / "x.pt")])
