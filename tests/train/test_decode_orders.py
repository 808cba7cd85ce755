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
    """The engine's vanilla decoding: final answers, commit step of every slot, and the inputs of every
    model call (input_ids, position_ids, mask), captured as the model received them."""
    cfg = DecodeConfig(mode="vanilla", max_new_tokens=gen, block_size=block, steps=steps)
    batch = make_batch(prompts, gen, model.config.mask_token_id, model.config.pad_token_id)
    calls = []

    def capture(module, args, kwargs):  # the decoder edits its buffer in place after the call: copy now
        x = args[0] if args else kwargs["input_ids"]
        calls.append((x.clone(), kwargs["position_ids"].clone(), kwargs["mask"]))
    handle = model.register_forward_pre_hook(capture, with_kwargs=True)
    log = StepLog(len(prompts), trace=True)
    try:
        decode(model, batch, cfg, log)
    finally:
        handle.remove()
    order = torch.full((len(prompts), gen), -1)
    for i, recs in enumerate(log.records):
        for r in recs:
            order[i, r["committed"]] = r["step"] - 1
    return batch.answer().clone(), order, calls


@pytest.mark.parametrize("steps", [16, 8])  # one token per forward, and two
def test_orders_and_states_are_the_engines_when_the_reference_is_its_own_answer(steps):
    """With the engine's own answer as the reference, replacing commits by the reference changes nothing, so the
    recorded order must be the engine's trace and every state the engine's buffer before that step."""
    model = random_model("tiny-llada", seed=3, std=0.5)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 100, (n,), generator=g).tolist() for n in (5, 9, 7)]  # unequal: left padding
    answers, engine_order, calls = engine_run(model, prompts, 16, 8, steps)
    assert len(calls) == steps  # vanilla decoding: one full-buffer forward per step
    orders = decode_orders(model, prompts, answers.tolist(), 16, 8, steps, batch_size=2)
    assert torch.equal(orders, engine_order)
    assert sorted(orders[0].tolist()) == sorted(list(range(steps)) * (16 // steps))

    d = {"orders": orders, "references": answers, "gen_len": 16, "block_size": 8, "steps": steps}
    mask = model.config.mask_token_id
    states = DecodeStates(d, prompts, mask, model.config.pad_token_id)
    idx = torch.tensor([2, 0, 1])
    for s in range(steps):
        x, pos, pattern, loss_at, targets = states.state(idx, torch.full((3,), s))
        seen_x, seen_pos, seen_mask = calls[s]  # what the model was given at step s
        assert torch.equal(x, seen_x[idx]) and torch.equal(pos, seen_pos[idx])
        assert pattern.kind == seen_mask.kind == "full"
        assert torch.equal(pattern.key_valid, seen_mask.key_valid[idx])
        P = x.shape[1] - 16
        assert torch.equal(targets[:, P:], answers[idx]) and torch.equal(targets[:, :P], x[:, :P])
        blk = s // (steps // 2)
        assert torch.equal(loss_at[:, P:], (x[:, P:] == mask) & (torch.arange(16) // 8 == blk))
        assert not loss_at[:, :P].any()
        committed = orders[idx] == s  # what step s chose is among the loss positions
        assert (loss_at[:, P:] | ~committed).all() and committed.any(-1).all()


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
    with pytest.raises(ValueError, match="steps 32 is more than gen_len 16"):
        decode_orders(model, [[3, 4]], [[1] * 16], 16, 8, 32)


# ---- the recipe ---------------------------------------------------------------------------------

from test_pretrain import Killed, fixed_batch_loss, tiny_cfg, tok_dir  # noqa: E402,F401
from train.pretrain import train  # noqa: E402


@pytest.fixture(scope="module")
def orders_file(tok_dir, tmp_path_factory):
    """Orders of a 1-step tiny teacher on the first 8 problems of the tiny recipe's data."""
    from train.decode_orders import main
    d = tmp_path_factory.mktemp("orders")
    train(tiny_cfg(tok_dir, d / "teacher", "llada_sft", max_steps=1))
    main(["--model", str(d / "teacher"), "--tokenizer", tok_dir, "--n", "8", "--max-new-tokens", "192",
          "--block-size", "64", "--steps", "48", "--batch-size", "4", "--out", str(d / "orders.pt")])
    return str(d / "orders.pt")


def states_loss(model, cfg, tok_dir, orders_file) -> float:
    """The decode-order loss on 16 fixed states."""
    from d2f.data.tokenizer import load_tokenizer
    from train.objectives import mean_masked_ce
    from train.pretrain import build_dataset, build_decode_states
    tok = load_tokenizer(tok_dir)
    states = build_decode_states(cfg, build_dataset(cfg, tok), tok)
    x, pos, pattern, at, targets = states.sample(16, torch.Generator().manual_seed(5))
    with torch.no_grad():
        return float(mean_masked_ce(model.eval()(x, pos, mask=pattern), targets, at))


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


@torch.no_grad()
def test_compute_loss_weights_the_three_parts_by_their_shares(tok_dir, orders_file):
    """A batch of 8: 2 decoding states, then 2 clean-prefix samples, then 4 LLaDA SFT samples; the loss is
    2/8, 2/8 and 4/8 of each part's own loss, and the SFT masks come from the generator after the states'."""
    from d2f.data.tokenizer import load_tokenizer
    from d2f.models import from_pretrained
    from train.objectives import (clean_prefix_layout, clean_prefix_loss, compute_loss, mean_masked_ce,
                                  forward_process, llada_sft_loss)
    from train.pretrain import build_dataset, build_decode_states, collate
    cfg = tiny_cfg(tok_dir, "unused", "llada_sft", decode_orders=orders_file, decode_order_frac=0.25,
                   clean_prefix_frac=0.25)
    tok = load_tokenizer(tok_dir)
    data = build_dataset(cfg, tok)
    model = from_pretrained(Path(orders_file).parent / "teacher").eval()
    ids, plen = collate(data[:6], tok.eos_token_id)  # the batch's 6 data samples
    g = torch.Generator().manual_seed(7)
    order_batch = build_decode_states(cfg, data, tok).sample(2, g)
    got = float(compute_loss(model, cfg, ids, plen, g, order_batch))

    x, pos, pattern, at, targets = order_batch
    part_order = float(mean_masked_ce(model(x, pos, mask=pattern), targets, at))
    both, bpos, attn, loss_at = clean_prefix_layout(ids[:2], plen[:2], tok.mask_token_id)
    part_prefix = float(clean_prefix_loss(model(both, bpos, mask=attn), ids[:2], loss_at, plen[:2]))
    g2 = torch.Generator().manual_seed(7)
    build_decode_states(cfg, data, tok).sample(2, g2)  # advance past the states' draws
    noisy, masked, p = forward_process(ids[2:], plen[2:], tok.mask_token_id, cfg.mask_eps, g2)
    part_sft = float(llada_sft_loss(model(noisy), ids[2:], masked, p, plen[2:]))
    assert min(part_order, part_prefix, part_sft) > 0
    assert math.isclose(got, 0.25 * part_order + 0.25 * part_prefix + 0.5 * part_sft, rel_tol=1e-5)


def test_orders_serve_data_padded_to_another_length(tok_dir, orders_file):
    """Orders recorded at gen 192 serve data EOS-padded to 160 or to 224 (a stage that trains a longer
    answer budget): the same states, since the states carry their own gen length."""
    from d2f.data.tokenizer import load_tokenizer
    from train.pretrain import build_dataset, build_decode_states
    tok = load_tokenizer(tok_dir)
    got = []
    for answer_len in (160, 224):
        cfg = tiny_cfg(tok_dir, "unused", "llada_sft", decode_orders=orders_file, decode_order_frac=0.25,
                       **{"data.answer_len": answer_len})
        got.append(build_decode_states(cfg, build_dataset(cfg, tok), tok).sample(4, torch.Generator().manual_seed(1)))
    assert all(torch.equal(a, b) for a, b in zip(got[0][:2] + got[0][3:], got[1][:2] + got[1][3:]))


def test_two_processes_draw_their_own_states_and_resume_exactly(tok_dir, orders_file, tmp_path):
    from test_pretrain import two_process_run_resumes_exactly
    two_process_run_resumes_exactly(tok_dir, tmp_path, decode_orders=orders_file, decode_order_frac=0.25,
                                    clean_prefix_frac=0.25)


def test_decode_order_config_errors(tok_dir, orders_file, tmp_path):
    with pytest.raises(ValueError, match="needs objective llada_sft and a decode_orders file"):
        train(tiny_cfg(tok_dir, tmp_path / "a", "llada_sft", decode_order_frac=0.5, clean_prefix_frac=0))
    with pytest.raises(ValueError, match=r"clean_prefix_frac \+ decode_order_frac \+ semi_ar_frac \+ result_mask_frac "
                                         r"must be <= 1"):
        train(tiny_cfg(tok_dir, tmp_path / "b", "llada_sft", decode_orders=orders_file, decode_order_frac=0.5,
                       clean_prefix_frac=0.75))
    with pytest.raises(ValueError, match=r"round to 2 \+ 2 \+ 0 \+ 0 samples, more than batch_size=3"):
        train(tiny_cfg(tok_dir, tmp_path / "g", "llada_sft", decode_orders=orders_file, decode_order_frac=0.5,
                       clean_prefix_frac=0.5, batch_size=3))  # each share rounds 1.5 up
    with pytest.raises(ValueError, match="decode_order_frac=0.1 rounds to 0 decoding states in a batch of 4"):
        train(tiny_cfg(tok_dir, tmp_path / "h", "llada_sft", decode_orders=orders_file, decode_order_frac=0.1,
                       clean_prefix_frac=0, batch_size=4))
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


def test_the_orders_stage_continues_the_teacher_recipe(tok_dir, orders_file):
    """configs/testbed_teacher_orders.yaml starts from the second stage's output with its model and data,
    and every forward of its objective (decoding states, calculator-result states, semi-AR states, LLaDA SFT)
    attends fully."""
    from d2f.data.tokenizer import load_tokenizer
    from d2f.models import build_model
    from d2f.yaml_config import load_config
    from test_pretrain import REPO, FullAttentionOnly, collate
    from train.objectives import compute_loss
    from train.pretrain import PretrainConfig, build_dataset, build_decode_states, calculator_vocab, model_config
    stage = load_config(PretrainConfig, REPO / "configs" / "testbed_teacher_orders.yaml")
    base = load_config(PretrainConfig, REPO / "configs" / "testbed_teacher_results.yaml")
    stage.validate()
    assert stage.init_from == base.output_dir and stage.clean_prefix_frac == 0
    assert stage.decode_order_frac > 0 and stage.result_mask_frac > 0 and stage.semi_ar_frac > 0
    assert stage.model == base.model and stage.data == base.data and stage.tokenizer == base.tokenizer
    small = load_config(PretrainConfig, REPO / "configs" / "testbed_teacher_orders.yaml",
                        [f"tokenizer={tok_dir}", "data.num_problems=16", f"decode_orders={orders_file}",
                         "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=2",
                         "model.intermediate_size=64"])
    tok = load_tokenizer(tok_dir)
    data = build_dataset(small, tok)
    states = build_decode_states(small, data, tok)
    wrapped = FullAttentionOnly(build_model(model_config(small, tok), seed=0))
    g = torch.Generator().manual_seed(0)
    order_batch = states.sample(small.n_decode_states, g)
    ids, plen = collate(data[:small.batch_size - small.n_decode_states], eos_id=1)
    loss = compute_loss(wrapped, small, ids, plen, g, order_batch, vocab_text=calculator_vocab(tok, tok_dir))
    assert torch.isfinite(loss) and wrapped.kinds == ["full"] * 4  # decoding states, SFT, semi-AR, results


def test_a_stopped_recording_continues_from_its_partial_file(tok_dir, orders_file, tmp_path, monkeypatch):
    """<out>.partial holds the rows after each batch; run again, the recording continues from it and gives
    the uninterrupted run's orders; other settings are refused while it exists."""
    import infer.vanilla
    from d2f.yaml_config import ConfigError
    from train.decode_orders import main
    teacher = str(Path(orders_file).parent / "teacher")
    args = ["--model", teacher, "--tokenizer", tok_dir, "--n", "6", "--max-new-tokens", "192", "--block-size", "64",
            "--steps", "48", "--batch-size", "2"]
    whole = main(args + ["--out", str(tmp_path / "whole.pt")])
    real, calls = infer.vanilla.decode, []

    def stop_on_third_batch(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise Killed
        return real(*a, **k)
    monkeypatch.setattr(infer.vanilla, "decode", stop_on_third_batch)
    out = tmp_path / "o.pt"
    with pytest.raises(Killed):
        main(args + ["--out", str(out)])
    assert not out.exists() and len(torch.load(f"{out}.partial")["orders"]) == 4
    with pytest.raises(ConfigError, match="other settings"):
        main(args[:-1] + ["3", "--out", str(out)])
    calls.clear()
    resumed = main(args + ["--out", str(out)])
    assert len(calls) == 1  # only the last batch was decoded again
    assert torch.equal(resumed["orders"], whole["orders"]) and not Path(f"{out}.partial").exists()
    assert torch.equal(torch.load(out)["orders"], whole["orders"])


@pytest.mark.parametrize("flag", ["--max-new-tokens", "--block-size", "--steps"])
def test_sizes_must_be_positive(flag, capsys):
    """A zero size is refused by the argument parser, one line naming the flag (it once reached a division)."""
    from train.decode_orders import main
    with pytest.raises(SystemExit):
        main(["--model", "m", "--n", "2", "--out", "o.pt", flag, "0"])
    assert f"argument {flag}: expected a positive integer, got 0" in capsys.readouterr().err
