"""The pretraining recipe: objectives (hand-checked), real steps that lower the loss, exact resume."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from d2f.yaml_config import ConfigError, load_config
from d2f.data.gsm import make_problems
from d2f.data.tokenizer import train_tokenizer
from d2f.models import from_pretrained
from train.objectives import causal_loss, causal_targets, forward_process, llada_sft_loss
from train.pretrain import PretrainConfig, collate, export_checkpoint, train

REPO = Path(__file__).resolve().parents[2]


# ---- objectives on hand-made tensors ------------------------------------------------------------

def test_llada_sft_loss_equals_hand_computation():
    torch.manual_seed(0)
    B, L, V = 2, 5, 7
    logits = torch.randn(B, L, V)
    ids = torch.randint(3, V, (B, L))
    prompt_lens = torch.tensor([2, 1])
    masked = torch.tensor([[False, False, True, False, True],
                           [False, True, True, True, False]])
    p = torch.tensor([0.5, 0.25])
    got = llada_sft_loss(logits, ids, masked, p, prompt_lens)
    want = 0.0
    for b in range(B):
        answer_len = L - int(prompt_lens[b])  # answer + EOS padding
        for i in range(L):
            if masked[b, i]:
                nll = -torch.log_softmax(logits[b, i], -1)[ids[b, i]]
                want += float(nll) / (float(p[b]) * answer_len)
    want /= B
    assert math.isclose(float(got), want, rel_tol=1e-6)


def test_forward_process_never_masks_the_prompt():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 50, (64, 40))
    prompt_lens = torch.randint(5, 20, (64,))
    noisy, masked, p = forward_process(ids, prompt_lens, mask_id=2, eps=1e-3, generator=g)
    pos = torch.arange(40)[None]
    assert not masked[pos < prompt_lens[:, None]].any()
    assert torch.equal(noisy[~masked], ids[~masked]) and (noisy[masked] == 2).all()
    assert ((p >= 1e-3) & (p <= 1)).all()
    # the masked share of each answer follows its p
    share = masked.sum(1).float() / (40 - prompt_lens).float()
    assert torch.corrcoef(torch.stack([share, p]))[0, 1] > 0.8


def test_clean_prefix_layout_rows_equal_one_forward_per_position_and_never_leak():
    """Row i of the mask copy == the last row of a forward over prompt + answer[:i] + [MASK] under
    d2f.masks.block_causal(prompt_len, 1); changing answer tokens from i on leaves rows <= i unchanged."""
    from d2f import masks
    from d2f.models import build_model, preset_config
    from train.objectives import clean_prefix_layout
    torch.manual_seed(0)
    cfg = preset_config("tiny-llada").replace(num_layers=2, vocab_size=64, embedding_size=64, mask_token_id=2)
    model = build_model(cfg, dtype=torch.float64, seed=0)
    B, L = 3, 11
    ids, plen = torch.randint(3, 64, (B, L)), torch.tensor([4, 6, 2])
    both, pos, attn, loss_at = clean_prefix_layout(ids, plen, mask_id=2)
    assert both.shape == (B, 2 * L) and (both[:, L:] == 2).all() and torch.equal(pos[:, :L], pos[:, L:])
    assert torch.equal(loss_at[:, L:], torch.arange(L)[None] >= plen[:, None]) and not loss_at[:, :L].any()
    out = model(both, pos, mask=attn)
    for b in range(B):
        P = int(plen[b])
        for i in range(P, L):
            x = torch.cat([ids[b, :i], torch.tensor([2])])[None]
            ref = model(x, mask=masks.block_causal(torch.tensor([P]), 1))[0, -1]
            torch.testing.assert_close(out[b, L + i], ref, rtol=1e-10, atol=1e-10)
            y = ids.clone()
            y[b, i:] = (y[b, i:] - 3 + 1) % 61 + 3  # every token from i on changes
            yb, yp, ya, _ = clean_prefix_layout(y, plen, mask_id=2)
            assert torch.equal(model(yb, yp, mask=ya)[b, L:L + i + 1], out[b, L:L + i + 1])


@torch.no_grad()
def test_clean_prefix_loss_and_batch_split_equal_hand_computation(tok_dir):
    """compute_loss with clean_prefix_frac: the first round(B * frac) samples take the clean-prefix CE
    (every answer token, weight 1 / answer length), the rest LLaDA SFT, weighted by their shares."""
    from d2f.data.tokenizer import load_tokenizer
    from d2f.models import build_model
    from train.objectives import clean_prefix_layout, clean_prefix_loss, compute_loss
    from train.pretrain import model_config
    cfg = tiny_cfg(tok_dir, "unused", "llada_sft", clean_prefix_frac=0.25)
    model = build_model(model_config(cfg, load_tokenizer(tok_dir)), seed=0).eval()
    torch.manual_seed(1)
    ids, plen = torch.randint(3, 100, (4, 9)), torch.tensor([3, 4, 2, 5])
    both, pos, attn, loss_at = clean_prefix_layout(ids[:1], plen[:1], 2)
    logits = model(both, pos, mask=attn)
    nll = -torch.log_softmax(logits[0, 9 + 3:], -1)[torch.arange(6), ids[0, 3:]]
    want_prefix = float(nll.sum() / 6)  # 6 answer tokens
    assert math.isclose(float(clean_prefix_loss(logits, ids[:1], loss_at, plen[:1])), want_prefix, rel_tol=1e-6)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    got = float(compute_loss(model, cfg, ids, plen, g1))
    noisy, masked, p = forward_process(ids[1:], plen[1:], 2, cfg.mask_eps, g2)
    want = 0.25 * want_prefix + 0.75 * float(llada_sft_loss(model(noisy), ids[1:], masked, p, plen[1:]))
    assert math.isclose(got, want, rel_tol=1e-5)


def test_causal_targets_and_loss():
    eos = 1
    ids = torch.tensor([[5, 6, 7, 8, 1, 1, 1],
                        [5, 9, 9, 9, 9, 9, 9]])
    labels = causal_targets(ids, torch.tensor([2, 3]), eos)
    assert labels.tolist() == [[-100, -100, 7, 8, 1, -100, -100],
                               [-100, -100, -100, 9, 9, 9, 9]]
    logits = torch.randn(2, 7, 10)
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 10), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(causal_loss(logits, labels), want)


def test_collate_pads_with_eos():
    ids, plen = collate([([4, 5, 6], 1), ([7, 8, 9, 10, 11], 2)], eos_id=1)
    assert ids.tolist() == [[4, 5, 6, 1, 1], [7, 8, 9, 10, 11]]
    assert plen.tolist() == [1, 2]


# ---- real runs on a tiny model ------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    ps = make_problems("train", 200, seed=0)
    tok = train_tokenizer([p["question"] for p in ps] + [p["answer"] for p in ps], vocab_size=500)
    d = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(str(d))
    return str(d)


def tiny_cfg(tok_dir, out, objective, **kw) -> PretrainConfig:
    overrides = [f"objective={objective}", f"output_dir={out}", f"tokenizer={tok_dir}", "model.hidden_size=32",
                 "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=2", "model.intermediate_size=64",
                 "data.num_problems=16", "data.answer_len=160", "batch_size=8", "lr=3e-3", "warmup_steps=2", "log_every=1",
                 "save_every=4", "num_threads=1", "init_from=",
                 # the clean-prefix mixture these tests were written for (LLaDA SFT + a clean-prefix term), not the
                 # shipped teacher's semi-AR mixture, which the full-attention tests below load as configured
                 "semi_ar_frac=0", "clean_prefix_frac=0.75", "keep_checkpoints=2"]
    overrides += [f"{k}={v}" for k, v in kw.items()]
    return load_config(PretrainConfig, REPO / "configs" / "testbed_teacher.yaml", overrides)


def fixed_batch_loss(model, cfg, tok_dir) -> float:
    """The objective on a fixed batch with fixed masks, so that losses of two models compare exactly."""
    from d2f.data.tokenizer import load_tokenizer
    from train.objectives import compute_loss
    from train.pretrain import build_dataset
    data = build_dataset(cfg, load_tokenizer(tok_dir))
    ids, plen = collate(data[:16], eos_id=1)
    with torch.no_grad():
        return float(compute_loss(model.eval(), cfg, ids, plen, torch.Generator().manual_seed(123)))


@pytest.mark.parametrize("objective", ["llada_sft", "causal"])
def test_loss_falls_and_model_saves(tok_dir, tmp_path, objective):
    from d2f.data.tokenizer import load_tokenizer
    from d2f.models import build_model
    from train.pretrain import model_config
    cfg = tiny_cfg(tok_dir, tmp_path / "run", objective, max_steps=60, lr=1e-2)
    res = train(cfg)
    assert len(res["losses"]) == 60 and all(math.isfinite(x) for x in res["losses"])
    model = from_pretrained(tmp_path / "run")
    initial = build_model(model_config(cfg, load_tokenizer(tok_dir)), seed=cfg.seed)
    before, after = fixed_batch_loss(initial, cfg, tok_dir), fixed_batch_loss(model, cfg, tok_dir)
    assert after < 0.6 * before, (before, after)
    assert model.config.is_causal == (objective == "causal")
    assert model.config.mask_token_id == 2 and model.config.eos_token_id == 1
    assert (tmp_path / "run" / "config.yaml").is_file() and (tmp_path / "run" / "tokenizer.json").is_file()
    ckpt = tmp_path / "run" / "checkpoint-60"
    assert (ckpt / "config.yaml").is_file() and (ckpt / "trainer_state.json").is_file()
    assert (ckpt / "rng_state_0.pt").is_file() and (ckpt / "generators_0.pt").is_file()
    last = from_pretrained(ckpt).state_dict()  # a checkpoint is a loadable model directory
    assert all(torch.equal(last[k], v) for k, v in model.state_dict().items())
    assert list((tmp_path / "run" / "tensorboard").iterdir())  # TensorBoard events were written


def test_init_from_an_ar_model(tok_dir, tmp_path):
    """A dLLM run can start from AR weights (model dir or checkpoint); shapes must match."""
    from d2f.data.tokenizer import load_tokenizer
    from d2f.models import build_model
    from train.pretrain import init_weights, model_config
    train(tiny_cfg(tok_dir, tmp_path / "ar", "causal", max_steps=4))
    cfg = tiny_cfg(tok_dir, tmp_path / "dllm", "llada_sft", max_steps=4)
    model = build_model(model_config(cfg, load_tokenizer(tok_dir)), seed=1)
    init_weights(model, tmp_path / "ar")
    ar = from_pretrained(tmp_path / "ar").state_dict()
    assert all(torch.equal(ar[k], v) for k, v in model.state_dict().items())
    assert not model.config.is_causal
    init_weights(model, tmp_path / "ar" / "checkpoint-4")  # a training checkpoint works too
    bigger = tiny_cfg(tok_dir, tmp_path / "x", "llada_sft", **{"model.hidden_size": 64})
    with pytest.raises(ValueError, match="does not match"):
        init_weights(build_model(model_config(bigger, load_tokenizer(tok_dir))), tmp_path / "ar")
    res = train(tiny_cfg(tok_dir, tmp_path / "dllm", "llada_sft", max_steps=4, init_from=tmp_path / "ar"))
    assert res["step"] == 4


def test_dream_teacher_starts_exactly_from_llada_layout_ar_weights(tok_dir, tmp_path):
    """model.arch=dream: init_from LLaDA-layout AR weights are converted to the Qwen2 layout with zero q/k/v
    biases (the same logits exactly), every llada_sft loss reads row i-1 for token i, and the run saves a
    Dream checkpoint. Clean prefix is refused: its layout assumes row i predicts token i."""
    from types import SimpleNamespace
    from d2f.data.tokenizer import load_tokenizer
    from d2f.models import build_model, shift_logits
    from train.objectives import compute_loss
    from train.pretrain import init_weights, model_config
    train(tiny_cfg(tok_dir, tmp_path / "ar", "causal", max_steps=4))
    dream = {"model.arch": "dream", "clean_prefix_frac": 0, "semi_ar_frac": 0.5}
    cfg = tiny_cfg(tok_dir, tmp_path / "dream", "llada_sft", **dream)
    model = build_model(model_config(cfg, load_tokenizer(tok_dir)), seed=1)
    init_weights(model, tmp_path / "ar")
    ar = from_pretrained(tmp_path / "ar")
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.config.is_causal = True
        assert torch.equal(model(ids), ar(ids))  # the AR model, one row per next token
        model.config.is_causal = False
        assert not torch.equal(model(ids), ar(ids))  # now full attention

    class AsLLaDA(torch.nn.Module):  # the same model seen as LLaDA-style (row i predicts token i)
        config = SimpleNamespace(logits_shift=0, mask_token_id=2, eos_token_id=1)

        def __init__(self, shift: bool):
            super().__init__()
            self.shift = shift

        def forward(self, *a, **k):
            return shift_logits(model(*a, **k)) if self.shift else model(*a, **k)
    batch = torch.randint(3, 200, (4, 40), generator=torch.Generator().manual_seed(1)), torch.tensor([8, 10, 12, 9])
    with torch.no_grad():
        loss = {name: compute_loss(m, cfg, *batch, torch.Generator().manual_seed(5)).item()
                for name, m in (("dream", model), ("shifted", AsLLaDA(True)), ("unshifted", AsLLaDA(False)))}
    assert loss["dream"] == loss["shifted"] != loss["unshifted"], loss
    with pytest.raises(ConfigError, match="clean_prefix_frac > 0 needs model.arch llada"):
        tiny_cfg(tok_dir, tmp_path / "x", "llada_sft", **{"model.arch": "dream", "clean_prefix_frac": 0.5}).validate()
    res = train(tiny_cfg(tok_dir, tmp_path / "dream", "llada_sft", max_steps=4, init_from=tmp_path / "ar", **dream))
    saved = from_pretrained(tmp_path / "dream")
    assert res["step"] == 4 and saved.config.arch == "dream" and not saved.config.is_causal
    assert json.loads((tmp_path / "dream" / "config.json").read_text())["model_type"] == "Dream"


class Killed(Exception):
    pass


RESULTS = {"clean_prefix_frac": 0, "semi_ar_frac": 0.25, "result_mask_frac": 0.5}  # every part of the bidir recipe


@pytest.mark.parametrize("objective", ["llada_sft", "causal", "results"])
def test_kill_and_resume_is_exact(tok_dir, tmp_path, objective):
    kw = RESULTS if objective == "results" else {}  # results: the masks drawn per calculator result resume too
    objective = "llada_sft" if objective == "results" else objective
    full = train(tiny_cfg(tok_dir, tmp_path / "full", objective, max_steps=10, **kw))["losses"]

    def kill_at_6(step, loss):
        if step == 6:  # the last checkpoint is step 4: steps 5 and 6 are lost and must be redone
            raise Killed
    with pytest.raises(Killed):
        train(tiny_cfg(tok_dir, tmp_path / "cut", objective, max_steps=10, **kw), on_step=kill_at_6)
    assert sorted(p.name for p in (tmp_path / "cut").iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-4"]
    # a stopped run can be shipped from its checkpoint
    ckpt = tmp_path / "cut" / "checkpoint-4"
    export_checkpoint(tiny_cfg(tok_dir, tmp_path / "cut", objective, **kw), ckpt, tmp_path / "exported")
    saved = from_pretrained(ckpt).state_dict()
    exported = from_pretrained(tmp_path / "exported").state_dict()
    assert all(torch.equal(saved[k], exported[k]) for k in saved)

    with pytest.raises(ConfigError, match="already holds checkpoints and resume=none"):
        train(tiny_cfg(tok_dir, tmp_path / "cut", objective, max_steps=10, resume="none", **kw))  # never overwrites
    resumed = train(tiny_cfg(tok_dir, tmp_path / "cut", objective, max_steps=10, **kw))
    assert resumed["step"] == 10
    assert resumed["losses"] == full[4:]  # bit-identical continuation
    a = from_pretrained(tmp_path / "full").state_dict()
    b = from_pretrained(tmp_path / "cut").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'lrr'"):
        load_config(PretrainConfig, REPO / "configs" / "testbed_teacher.yaml", ["lrr=1"])
    with pytest.raises(ConfigError, match="hidden_sise"):
        load_config(PretrainConfig, REPO / "configs" / "testbed_ar.yaml", ["model.hidden_sise=8"])
    cfg = load_config(PretrainConfig, REPO / "configs" / "testbed_ar.yaml", ["objective=mlm"])
    with pytest.raises(ValueError, match="objective 'mlm'"):
        train(cfg)
    cfg = load_config(PretrainConfig, REPO / "configs" / "testbed_teacher.yaml", ["clean_prefix_frac=1.5"])
    with pytest.raises(ValueError, match="clean_prefix_frac must be in"):
        train(cfg)
    cfg = load_config(PretrainConfig, REPO / "configs" / "testbed_teacher.yaml", ["result_mask_frac=0.5"])
    with pytest.raises(ValueError, match=r"clean_prefix_frac \+ decode_order_frac \+ semi_ar_frac \+ result_mask_frac "
                       r"must be <= 1 \(shares of one batch\), got 0.0 \+ 0.0 \+ 0.75 \+ 0.5"):
        train(cfg)
    cfg = load_config(PretrainConfig, REPO / "configs" / "testbed_ar.yaml", ["result_mask_frac=0.5"])
    with pytest.raises(ValueError, match="result_mask_frac > 0 needs objective llada_sft, got objective 'causal'"):
        train(cfg)


def test_two_cpu_processes_save_every_rank_state_and_resume_exactly(tok_dir, tmp_path):
    """DDP over gloo (configs/accelerate/cpu_ddp.yaml): each rank draws its own masks and saves its own RNG
    and mask-generator state, so a 2-process run resumed from its step-4 checkpoint (in a new output_dir)
    ends with exactly the weights of the uninterrupted run."""
    two_process_run_resumes_exactly(tok_dir, tmp_path)


def two_process_run_resumes_exactly(tok_dir, tmp_path, **kw):
    """The DDP resume check above, for the tiny recipe with overrides `kw`."""
    import os
    import shutil
    import subprocess
    import sys
    import yaml
    from d2f.yaml_config import to_dict

    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(to_dict(tiny_cfg(tok_dir, tmp_path / "full", "llada_sft", max_steps=6,
                                                        save_every=2, keep_checkpoints=0, **kw))))
    accelerate = str(Path(sys.executable).parent / "accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(out, *extra):
        cmd = [accelerate, "launch", "--config_file", str(REPO / "configs/accelerate/cpu_ddp.yaml"),
               "--main_process_port", "29551", str(REPO / "train/pretrain.py"), "--config", str(cfg_file),
               f"output_dir={out}", *extra]
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r.stdout

    assert "2 process(es)" in launch(tmp_path / "full")
    ckpt = tmp_path / "full" / "checkpoint-4"
    assert {p.name for p in ckpt.glob("*_[01].pt")} == {"rng_state_0.pt", "rng_state_1.pt",
                                                         "generators_0.pt", "generators_1.pt"}
    g0, g1 = (torch.load(ckpt / f"generators_{r}.pt", weights_only=False)["mask"] for r in (0, 1))
    assert not torch.equal(g0, g1)  # one mask stream per rank
    shutil.copytree(ckpt, tmp_path / "elsewhere" / "checkpoint-4")
    launch(tmp_path / "resumed", f"resume={tmp_path / 'elsewhere' / 'checkpoint-4'}")
    a, b = from_pretrained(tmp_path / "full").state_dict(), from_pretrained(tmp_path / "resumed").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- semi-autoregressive states and the bidirectional teacher -------------------------------------

def test_semi_ar_process_masks_one_partial_block_and_everything_after_it():
    from train.objectives import semi_ar_loss, semi_ar_process
    g = torch.Generator().manual_seed(0)
    B, L, block = 64, 70, 8
    ids = torch.randint(3, 50, (B, L))
    plen = torch.randint(5, 20, (B,))
    content = torch.randint(1, 40, (B,))  # answer tokens before EOS; the last 8 rows have no EOS
    for i in range(B - 8):
        ids[i, plen[i] + content[i]:] = 1  # EOS, then EOS padding to L
    noisy, loss_at, p = semi_ar_process(ids, plen, 2, 1, 1e-3, block, g)
    masked = noisy == 2
    seen_blocks, eos_blocks = set(), 0
    for i in range(B):
        off = torch.arange(L) - plen[i]
        m = masked[i]
        assert not m[off < 0].any()  # the prompt is never masked
        # the drawn block: where its masked slots (the loss positions) are; none masked: the block before the
        # first masked slot, or the answer's last block if nothing is masked
        first = int(off[m].min()) if m.any() else int(L - plen[i]) + block - 1
        b = int(off[loss_at[i]].min()) // block if loss_at[i].any() else first // block - 1
        assert loss_at[i].any() or first % block == 0 or not m.any()
        seen_blocks.add(b)
        if i < B - 8:
            assert b * block <= content[i]  # a block of EOS padding alone is never drawn
            eos_blocks += (int(L - plen[i]) - 1) // block > int(content[i]) // block  # this answer had some
        else:
            assert b * block < L - plen[i]  # no EOS: any block of the answer
        start, end = b * block, (b + 1) * block
        assert torch.equal(noisy[i][off < start], ids[i][off < start])  # earlier blocks clean
        assert m[off >= end].all()  # every later block masked
        assert torch.equal(loss_at[i], m & (off >= start) & (off < end))  # the loss: the block's masked slots
    assert len(seen_blocks) > 3 and eos_blocks > 20  # the block is drawn, not fixed; the EOS rule was tested
    # the loss: sum over the block's masked slots of CE / (p * block), over B
    logits = torch.randn(B, L, 60)
    ce = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none").view(B, L)
    want = sum(float(ce[i][loss_at[i]].sum() / (p[i] * block)) for i in range(B)) / B
    assert float(semi_ar_loss(logits, ids, loss_at, p, block)) == pytest.approx(want, rel=1e-5)


def test_result_process_masks_whole_calculator_results_and_their_later_occurrences(tok_dir, monkeypatch):
    """Each sample: the prompt clean; at least one calculator result masked, each with every later occurrence
    of its number; about half of the results masked; with the extra masking off, nothing else masked."""
    import re
    import train.objectives as O
    from d2f.data.tokenizer import load_tokenizer, encode_problems
    from train.pretrain import calculator_vocab
    tok = load_tokenizer(tok_dir)
    vocab = calculator_vocab(tok, tok_dir)
    probs = make_problems("train", 64, seed=3)
    ids, plen = collate(encode_problems(probs, tok, 128), eos_id=1)
    monkeypatch.setattr(O, "RESULT_EXTRA_MASK_MAX", 0.0)
    noisy, masked = O.result_process(ids, plen, 2, 1, vocab, torch.Generator().manual_seed(0))
    assert torch.equal(noisy, torch.where(masked, torch.full_like(ids, 2), ids))
    n_results = n_chosen = 0
    for i, pr in enumerate(probs):
        m = masked[i]
        assert not m[:plen[i]].any()
        spans = O.number_spans(ids[i].tolist(), vocab)
        answer = [s for s in spans if s[0] >= plen[i]]
        assert [v for _, _, v in answer] == re.findall(r"[0-9]+", pr["answer"])  # every number, whole
        results = [s for s in answer if tok.decode([int(ids[i, s[0] - 1])]) == "="]
        chosen = {v for s, e, v in results if m[s:e].all()}
        assert chosen and len(results) >= 2  # at least one result masked; the problems have 2-4 steps
        first = {v: min(s for s, _, w in results if w == v) for v in chosen}
        want = torch.zeros_like(m)
        for s, e, v in answer:
            if v in chosen and s >= first[v]:
                want[s:e] = True
        assert torch.equal(m, want)  # exactly the chosen results and their later occurrences
        n_results, n_chosen = n_results + len(results), n_chosen + len(chosen)
    assert 0.4 < n_chosen / n_results < 0.75  # ~1/2 each, and at least one per sample
    # the extra masking: other answer tokens too, never the prompt
    monkeypatch.setattr(O, "RESULT_EXTRA_MASK_MAX", 0.2)
    _, masked = O.result_process(ids, plen, 2, 1, vocab, torch.Generator().manual_seed(0))
    assert masked.sum() > want.sum() and all(not masked[i, :plen[i]].any() for i in range(len(probs)))


def test_result_share_of_the_batch_is_mean_masked_ce_on_result_states(tok_dir):
    """compute_loss with result_mask_frac=1: the whole batch is result states, scored by mean_masked_ce, drawn
    from the recipe's generator; a tokenizer without '=' is refused in one line."""
    from d2f.data.tokenizer import load_tokenizer
    from d2f.models import build_model
    from train.objectives import compute_loss, mean_masked_ce, result_process
    from train.pretrain import build_dataset, calculator_vocab, model_config
    cfg = tiny_cfg(tok_dir, "unused", "llada_sft", clean_prefix_frac=0, result_mask_frac=1.0)
    tok = load_tokenizer(tok_dir)
    vocab = calculator_vocab(tok, tok_dir)
    model = build_model(model_config(cfg, tok), seed=0).eval()
    ids, plen = collate(build_dataset(cfg, tok)[:8], eos_id=1)
    with torch.no_grad():
        got = compute_loss(model, cfg, ids, plen, torch.Generator().manual_seed(7), vocab_text=vocab)
        noisy, masked = result_process(ids, plen, 2, 1, vocab, torch.Generator().manual_seed(7))
        want = mean_masked_ce(model(noisy), ids, masked)
    assert float(got) == pytest.approx(float(want), rel=1e-6) and float(got) > 0
    words = type("Words", (), {"decode": lambda self, t: ["<pad>", "a", "b"][t[0]], "__len__": lambda self: 3})()
    with pytest.raises(ConfigError, match="tokenizer 'words' has none: set result_mask_frac=0"):
        calculator_vocab(words, "words")


class FullAttentionOnly(torch.nn.Module):
    """Wraps a model and fails on any forward that is not full attention (no pattern, or a "full" one)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.kinds = model, model.config, []

    def forward(self, x, position_ids=None, mask=None, **kw):
        from d2f.masks import Pattern
        kind = "full" if mask is None else (mask.kind if isinstance(mask, Pattern) else "explicit tensor")
        self.kinds.append(kind)
        assert kind == "full", f"a training forward used a {kind!r} attention pattern"
        return self.model(x, position_ids, mask=mask, **kw)


@pytest.mark.parametrize("config", ["testbed_teacher.yaml", "testbed_teacher_results.yaml"])
def test_teacher_recipe_trains_with_full_attention_only(tok_dir, config):
    """The teacher's configs: the model is not causal, and every forward of the objective
    (LLaDA SFT, semi-autoregressive and calculator-result states) attends fully, as LLaDA and Dream were
    trained."""
    from d2f.data.tokenizer import load_tokenizer
    from d2f.models import build_model
    from train.objectives import compute_loss
    from train.pretrain import build_dataset, calculator_vocab, model_config
    cfg = load_config(PretrainConfig, REPO / "configs" / config, [f"tokenizer={tok_dir}", "data.num_problems=16"])
    assert cfg.objective == "llada_sft" and cfg.clean_prefix_frac == 0
    tok = load_tokenizer(tok_dir)
    small = load_config(PretrainConfig, REPO / "configs" / config,
                        [f"tokenizer={tok_dir}", "data.num_problems=16", "model.hidden_size=32", "model.num_layers=1",
                         "model.num_heads=2", "model.num_kv_heads=2", "model.intermediate_size=64"])
    model = build_model(model_config(small, tok), seed=0)
    assert not model.config.is_causal
    wrapped = FullAttentionOnly(model)
    ids, plen = collate(build_dataset(small, tok)[:small.batch_size], eos_id=1)
    vocab = calculator_vocab(tok, tok_dir) if small.result_mask_frac > 0 else None
    loss = compute_loss(wrapped, small, ids, plen, torch.Generator().manual_seed(0), vocab_text=vocab)
    parts = [small.semi_ar_frac, small.result_mask_frac, 1 - small.semi_ar_frac - small.result_mask_frac]
    assert torch.isfinite(loss) and len(wrapped.kinds) == sum(f > 0 for f in parts)  # one forward per part
    # the check can fail: a clean-prefix term (the testbed's earlier teacher recipe) is not full attention
    old = load_config(PretrainConfig, REPO / "configs" / "testbed_teacher.yaml",
                      ["semi_ar_frac=0", "clean_prefix_frac=0.75", f"tokenizer={tok_dir}", "data.num_problems=16",
                       "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=2",
                       "model.intermediate_size=64"])
    with pytest.raises(AssertionError, match="explicit tensor"):
        compute_loss(FullAttentionOnly(build_model(model_config(old, tok), seed=0)), old, ids, plen,
                     torch.Generator().manual_seed(0))


def test_teacher_stages_chain():
    """The teacher stages run in order, each from the previous one's output with the same model: stage 1 from
    the AR baseline, stage 2 from stage 1, and the documented third-stage experiment from stage 2.
    scripts/build_testbed.sh runs stages 1-2 and exports stage 2 as testbed/teacher (no decoding orders)."""
    stages = [load_config(PretrainConfig, REPO / "configs" / f"testbed_teacher{s}.yaml")
              for s in ("", "_results", "_orders")]
    assert str(stages[0].init_from) == "testbed/ar"
    for before, after in zip(stages, stages[1:]):
        assert after.init_from == before.output_dir and after.model == before.model
    build = (REPO / "scripts" / "build_testbed.sh").read_text()
    runs = [Path(s.output_dir).name for s in stages]
    for cfg in ("testbed_teacher.yaml", "testbed_teacher_results.yaml"):
        assert f"--config configs/{cfg}" in build
    assert "--config configs/testbed_teacher_orders.yaml" not in build and "decode_orders.py" not in build
    assert f"export_model teacher {runs[1]}" in build


def test_resume_refuses_another_objective_applies_a_changed_lr_and_logs_each_step_once(tok_dir, tmp_path):
    import json
    from train.schedule import lr_factor
    out = tmp_path / "run"

    def stop_at_6(step, loss):
        if step == 6:  # newest checkpoint: step 4; steps 5-6 are logged, then redone
            raise Killed
    with pytest.raises(Killed):
        train(tiny_cfg(tok_dir, out, "llada_sft", max_steps=10), on_step=stop_at_6)
    with pytest.raises(ConfigError, match=r"objective: 'llada_sft' -> 'causal'"):
        train(tiny_cfg(tok_dir, out, "causal", max_steps=10))
    train(tiny_cfg(tok_dir, out, "llada_sft", max_steps=10, lr=1e-3))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11))
    # the logged lr is the one the step used: optimizer step s-1 (0-based) of the schedule x base lr; the
    # new base from step 5 on
    for r in rows:
        base = 3e-3 if r["step"] <= 4 else 1e-3
        assert r["train/lr"] == pytest.approx(base * lr_factor(r["step"] - 1, 2, 10, "cosine", 0.1)), r["step"]


@pytest.mark.parametrize("objective", ["llada_sft", "causal"])
def test_held_out_eval_logs_what_infer_eval_measures_on_the_saved_model(tok_dir, tmp_path, objective):
    """eval_every: the logged figures are infer.eval's on the same weights (a dLLM: vanilla, D2F without adapter
    and their gap; the AR baseline: mode ar), at every eval_every steps and at the end."""
    import json
    from infer.eval import main as eval_main
    out = tmp_path / "run"
    losses = train(tiny_cfg(tok_dir, out, objective, max_steps=5, eval_every=4, eval_problems=3,
                            eval_batch_size=2))["losses"]
    # the eval leaves training alone: the same losses as a run without it
    assert losses == train(tiny_cfg(tok_dir, tmp_path / "no_eval", objective, max_steps=5))["losses"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in rows if any(k.startswith("eval/") for k in r)}
    assert sorted(evals) == [4, 5]  # every 4 steps, and the last
    assert evals[5]["eval/seconds"] > 0
    modes = ["ar"] if objective == "causal" else ["vanilla", "d2f"]
    settings = {"ar": ["--mode", "ar"], "vanilla": ["--mode", "vanilla", "--block-size", "32", "--steps", "128"],
                "d2f": ["--mode", "d2f", "--block-size", "16", "--tau-add", "0.7", "--tau-act", "0.95",
                        "--tau-conf", "0.99"]}
    for mode in modes:  # step 5 is the saved model: infer.eval on it gives the same answers and figures
        s = eval_main(["--model", str(out), "--limit", "3", "--max-new-tokens", "128", "--threads", "1",
                       "--output-dir", str(tmp_path / mode), "--no-progress", *settings[mode]])
        ours = json.loads((out / "eval" / "step-5" / mode / "summary.json").read_text())
        assert evals[5][f"eval/{mode}_accuracy"] == ours["accuracy"] == s["accuracy"]
        assert evals[5][f"eval/{mode}_answer_tokens"] == s["answer_tokens_mean"] > 0
        theirs = [json.loads(x) for x in (tmp_path / mode / "predictions.jsonl").read_text().splitlines()]
        mine = [json.loads(x) for x in (out / "eval" / "step-5" / mode / "predictions.jsonl").read_text().splitlines()]
        assert [r["output"] for r in mine] == [r["output"] for r in theirs] and len(mine) == 3
        assert (out / "eval" / "step-4" / mode / "summary.json").is_file()
    if objective == "llada_sft":
        assert evals[5]["eval/gap"] == pytest.approx(evals[5]["eval/vanilla_accuracy"] - evals[5]["eval/d2f_accuracy"])
    else:
        assert "eval/gap" not in evals[5]
    for bad, match in (("eval_every=-1", "eval_every must be"), ("eval_problems=0", "eval_problems must be")):
        with pytest.raises(ConfigError, match=match):
            tiny_cfg(tok_dir, out, objective, **dict([bad.split("=")])).validate()


def test_keep_steps_keeps_those_checkpoints_past_keep_checkpoints(tok_dir, tmp_path):
    """A milestone (e.g. the early AR weights a teacher starts from) survives pruning; resume still takes the newest."""
    from train.checkpoint import latest_checkpoint
    out = tmp_path / "run"
    train(tiny_cfg(tok_dir, out, "causal", max_steps=8, save_every=2, keep_checkpoints=1, keep_steps="[4]"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    assert latest_checkpoint(out).name == "checkpoint-8"
    res = train(tiny_cfg(tok_dir, tmp_path / "dllm", "llada_sft", max_steps=2, init_from=out / "checkpoint-4"))
    assert res["step"] == 2
    with pytest.raises(ConfigError, match=r"keep_steps \[3\] name steps without a checkpoint"):
        tiny_cfg(tok_dir, out, "causal", max_steps=8, save_every=2, keep_steps="[4,3]").validate()
