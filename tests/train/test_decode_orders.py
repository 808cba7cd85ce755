"""Decoding orders (train/decode_orders.py): the recorded order and states are the engine's vanilla decoding,
and the recipe trains on them, resumes exactly and rejects files that do not match its data."""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "infer"))

from helpers import random_model  # noqa: E402
from infer.api import DecodeConfig  # noqa: E402
from infer.batch import make_batch  # noqa: E402
from infer.steps import StepLog  # noqa: E402
from infer.vanilla import decode  # noqa: E402
from train.decode_orders import DecodeStates, decode_orders, order_state  # noqa: E402


def engine_run(model, prompts, gen, block, steps):
    """The engine's vanilla decoding: final answers, commit step of every slot, buffer after every step."""
    cfg = DecodeConfig(mode="vanilla", max_new_tokens=gen, block_size=block, steps=steps)
    batch = make_batch(prompts, gen, model.config.mask_token_id, model.config.pad_token_id)
    after = []
    log = StepLog(len(prompts), trace=True, on_step=lambda info: after.append(info["answer"].clone()))
    decode(model, batch, cfg, log)
    order = torch.full((len(prompts), gen), -1)
    for i, recs in enumerate(log.records):
        for r in recs:
            order[i, r["committed"]] = r["step"] - 1
    return batch.answer().clone(), order, after


@pytest.mark.parametrize("steps", [16, 8])  # one token per forward, and two
def test_orders_and_states_are_the_engines_when_the_reference_is_its_own_answer(steps):
    """With the engine's own answer as the reference, replacing commits by the reference changes nothing, so the
    recorded order must be the engine's trace and every state the engine's buffer before that step."""
    model = random_model("tiny-llada", seed=3, std=0.5)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 100, (n,), generator=g).tolist() for n in (5, 9, 7)]  # unequal: left padding
    answers, engine_order, after = engine_run(model, prompts, 16, 8, steps)
    orders = decode_orders(model, prompts, answers.tolist(), 16, 8, steps, batch_size=2)
    assert torch.equal(orders, engine_order)
    assert sorted(orders[0].tolist()) == sorted(list(range(steps)) * (16 // steps))

    d = {"orders": orders, "references": answers, "gen_len": 16, "block_size": 8, "steps": steps}
    mask = model.config.mask_token_id
    states = DecodeStates(d, prompts, mask, model.config.pad_token_id)
    for s in range(steps):
        idx = torch.tensor([2, 0, 1])
        x, pos, pattern, loss_at, targets = states.state(idx, torch.full((3,), s))
        before = after[s - 1][idx] if s else torch.full((3, 16), mask)
        P = x.shape[1] - 16
        assert torch.equal(x[:, P:], before)
        assert torch.equal(targets[:, P:], answers[idx])
        blk = s // (steps // 2)
        assert torch.equal(loss_at[:, P:], (before == mask) & (torch.arange(16) // 8 == blk))
        committed = orders[idx] == s  # what step s chose is among the loss positions
        assert (loss_at[:, P:] | ~committed).all() and committed.any(-1).all()
        want = make_batch([prompts[i] for i in idx.tolist()], 16, mask, model.config.pad_token_id)
        assert torch.equal(x[:, :P], want.x[:, :P]) and torch.equal(pos, want.position_ids)
        assert pattern is not None and torch.equal(pattern.key_valid, want.key_valid)


def test_order_state_by_hand():
    order = torch.tensor([[0, 2, 1, 3, 5, 4, 7, 6]])  # 8 slots, blocks of 4, 4 steps per block
    masked, at = order_state(order, torch.tensor([2]), 4, 4)
    assert masked.tolist() == [[False, True, False, True, True, True, True, True]]
    assert at.tolist() == [[False, True, False, True, False, False, False, False]]
    masked, at = order_state(order, torch.tensor([5]), 4, 4)
    assert at.tolist() == [[False, False, False, False, True, False, True, True]]


def test_decode_orders_rejects_bad_shapes():
    model = random_model("tiny-llada")
    with pytest.raises(ValueError, match="block_size 5 does not divide gen_len 16"):
        decode_orders(model, [[3, 4]], [[1] * 16], 16, 5, 16)
    with pytest.raises(ValueError, match="steps 6 is not a multiple of the number of blocks 4"):
        decode_orders(model, [[3, 4]], [[1] * 16], 16, 4, 6)
    with pytest.raises(ValueError, match="reference 0 has 15 tokens, not gen_len=16"):
        decode_orders(model, [[3, 4]], [[1] * 15], 16, 8, 16)


# ---- the recipe ---------------------------------------------------------------------------------

from test_pretrain import Killed, fixed_batch_loss, tiny_cfg, tok_dir  # noqa: E402,F401
from train.pretrain import train  # noqa: E402


@pytest.fixture(scope="module")
def orders_file(tok_dir, tmp_path_factory):
    """Orders of a 1-step tiny teacher on the first 8 problems of the tiny recipe's data."""
    from train.decode_orders import main
    d = tmp_path_factory.mktemp("orders")
    train(tiny_cfg(tok_dir, d / "teacher", "llada_sft", max_steps=1))
    main(["--model", str(d / "teacher"), "--tokenizer", tok_dir, "--n", "8", "--gen", "192", "--block", "64",
          "--steps", "48", "--batch-size", "4", "--out", str(d / "orders.pt")])
    return str(d / "orders.pt")


def states_loss(model, cfg, tok_dir, orders_file) -> float:
    """The decode-order loss on 16 fixed states."""
    from d2f.data.tokenizer import load_tokenizer
    from train.decode_orders import decode_order_loss
    from train.pretrain import build_dataset, build_decode_states
    tok = load_tokenizer(tok_dir)
    states = build_decode_states(cfg, build_dataset(cfg, tok), tok)
    x, pos, pattern, at, targets = states.sample(16, torch.Generator().manual_seed(5))
    with torch.no_grad():
        return float(decode_order_loss(model.eval()(x, pos, mask=pattern), targets, at))


def test_training_on_decode_states_lowers_their_loss_and_resumes_exactly(tok_dir, orders_file, tmp_path):
    from d2f.models import from_pretrained
    teacher = Path(orders_file).parent / "teacher"
    kw = {"decode_orders": orders_file, "decode_order_frac": 0.5, "clean_prefix_frac": 0.25, "max_steps": 12,
          "lr": 1e-2, "init_from": teacher}
    full = train(tiny_cfg(tok_dir, tmp_path / "full", "llada_sft", **kw))
    assert all(math.isfinite(v) for v in full["losses"])
    cfg = tiny_cfg(tok_dir, tmp_path / "full", "llada_sft", **kw)
    start = from_pretrained(teacher)
    before = states_loss(start, cfg, tok_dir, orders_file)
    after = states_loss(from_pretrained(tmp_path / "full"), cfg, tok_dir, orders_file)
    assert after < 0.7 * before, (before, after)
    plain = tiny_cfg(tok_dir, tmp_path / "full", "llada_sft", clean_prefix_frac=0.25)  # the data samples' objective
    assert fixed_batch_loss(from_pretrained(tmp_path / "full"), plain, tok_dir) < fixed_batch_loss(start, plain, tok_dir)

    def kill_at_6(step, loss):
        if step == 6:
            raise Killed
    with pytest.raises(Killed):
        train(tiny_cfg(tok_dir, tmp_path / "cut", "llada_sft", **kw), on_step=kill_at_6)
    resumed = train(tiny_cfg(tok_dir, tmp_path / "cut", "llada_sft", **kw))
    assert resumed["losses"] == full["losses"][4:]  # the states drawn after the resume are the same ones


def test_decode_order_config_errors(tok_dir, orders_file, tmp_path):
    with pytest.raises(ValueError, match="needs objective llada_sft and a decode_orders file"):
        train(tiny_cfg(tok_dir, tmp_path / "a", "llada_sft", decode_order_frac=0.5, clean_prefix_frac=0))
    with pytest.raises(ValueError, match=r"clean_prefix_frac \+ decode_order_frac must be <= 1"):
        train(tiny_cfg(tok_dir, tmp_path / "b", "llada_sft", decode_orders=orders_file, decode_order_frac=0.5,
                       clean_prefix_frac=0.75))
    with pytest.raises(ValueError, match="leaves no data samples"):
        train(tiny_cfg(tok_dir, tmp_path / "c", "llada_sft", decode_orders=orders_file, decode_order_frac=1.0,
                       clean_prefix_frac=0))
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        train(tiny_cfg(tok_dir, tmp_path / "d", "llada_sft", decode_orders=tmp_path / "nowhere.pt",
                       decode_order_frac=0.5, clean_prefix_frac=0))
    with pytest.raises(ValueError, match="not a prefix of this recipe's data"):
        train(tiny_cfg(tok_dir, tmp_path / "e", "llada_sft", decode_orders=orders_file, decode_order_frac=0.5,
                       clean_prefix_frac=0, **{"data.seed": 1}))
    d = torch.load(orders_file, weights_only=True)
    d["references"][3, 0] += 1  # another tokenizer would do this
    torch.save(d, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="problem 3 of .* does not match this recipe's data"):
        train(tiny_cfg(tok_dir, tmp_path / "f", "llada_sft", decode_orders=tmp_path / "other.pt",
                       decode_order_frac=0.5, clean_prefix_frac=0, max_steps=1))


def test_the_orders_stage_config_continues_the_teacher_recipe():
    from d2f.config import load_config
    from test_pretrain import REPO
    from train.pretrain import PretrainConfig
    stage = load_config(PretrainConfig, REPO / "configs" / "testbed_teacher_orders.yaml")
    base = load_config(PretrainConfig, REPO / "configs" / "testbed_teacher.yaml")
    stage.validate()
    assert stage.model == base.model and stage.data == base.data and stage.tokenizer == base.tokenizer
    assert stage.init_from == base.output_dir and stage.decode_order_frac > 0
