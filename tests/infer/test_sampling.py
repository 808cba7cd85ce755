import pytest
import torch

from infer.sampling import commit_factor, commit_threshold, commit_topk, predict, vanilla_schedule


def test_vanilla_schedule_remainder_on_earliest_steps():
    s = vanilla_schedule(torch.tensor([10, 8, 3]), 4)
    assert s.tolist() == [[3, 3, 2, 2], [2, 2, 2, 2], [1, 1, 1, 0]]
    assert s.sum(-1).tolist() == [10, 8, 3]


def test_predict_greedy_confidence_is_float64_softmax_of_argmax():
    logits = torch.tensor([[[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]]], dtype=torch.float32)
    tok, conf = predict(logits)
    assert tok.tolist() == [[1, 0]]
    assert conf.dtype == torch.float64
    expect = torch.softmax(logits.double(), -1).max(-1).values
    assert torch.allclose(conf, expect)


def test_predict_excludes_token_and_samples_with_seed():
    logits = torch.tensor([[[5.0, 0.0, 4.0]]])
    tok, _ = predict(logits, exclude=0)
    assert tok.item() == 2
    big = torch.zeros(1, 200, 3)
    a, _ = predict(big, 1.0, torch.Generator().manual_seed(3))
    b, _ = predict(big, 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and len(set(a.flatten().tolist())) == 3  # uniform logits: all tokens drawn


def test_commit_topk_only_masked_and_capped():
    conf = torch.tensor([[0.9, 0.8, 0.7, 0.6], [0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    masked = torch.tensor([[False, True, True, True], [True, True, False, False]])
    sel = commit_topk(conf, masked, torch.tensor([2, 5]))
    assert sel.tolist() == [[False, True, True, False], [True, True, False, False]]


def test_commit_threshold_at_least_one_and_strictness():
    conf = torch.tensor([[0.95, 0.9, 0.5], [0.3, 0.2, 0.1], [0.3, 0.2, 0.1]], dtype=torch.float64)
    masked = torch.ones(3, 3, dtype=torch.bool)
    masked[2] = False
    sel = commit_threshold(conf, masked, 0.9)
    assert sel.tolist() == [[True, True, False], [True, False, False], [False, False, False]]
    sel = commit_threshold(conf, masked, 0.9, strict=True, at_least_one=torch.tensor([True, False, True]))
    assert sel.tolist() == [[True, False, False], [False, False, False], [False, False, False]]


def test_commit_factor_rule():
    # sorted conf 0.9, 0.8, 0.7, 0.3: (n+1)(1-c_n) = 0.2, 0.6, 1.2, 3.5 -> n = 2 at f = 1
    conf = torch.tensor([[0.7, 0.9, 0.3, 0.8]], dtype=torch.float64)
    masked = torch.ones(1, 4, dtype=torch.bool)
    assert commit_factor(conf, masked, 1.0).tolist() == [[False, True, False, True]]
    assert commit_factor(conf, masked, 1.25).tolist() == [[True, True, False, True]]
    # nothing passes: still the single most confident one
    low = torch.tensor([[0.1, 0.2, 0.05, 0.15]], dtype=torch.float64)
    assert commit_factor(low, masked, 1.0).tolist() == [[False, True, False, False]]
    # unmasked positions are never chosen
    m = torch.tensor([[True, False, True, False]])
    assert commit_factor(conf, m, 1.0).tolist() == [[True, False, False, False]]


def float64_predict(logits, temperature=0.0, generator=None, exclude=None):
    """The greedy confidence as it was computed before: a float64 softmax over the whole vocabulary."""
    assert temperature == 0
    logits = logits.double()
    if exclude is not None:
        logits[..., exclude] = float("-inf")
    tokens = logits.argmax(-1)
    return tokens, torch.softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]


def test_predict_keeps_float64_resolution_near_one():
    # margins of 25 and 26 nats: both probabilities round to 1.0 in float32, a float64 softmax
    # still orders them, and so must predict (vanilla's top-k ranks such positions)
    logits = torch.zeros(1, 2, 1024)
    logits[0, 0, 3], logits[0, 1, 4] = 25.0, 26.0
    _, conf = predict(logits)
    _, want = float64_predict(logits)
    assert conf[0, 0] < conf[0, 1] < 1.0
    torch.testing.assert_close(1 - conf, 1 - want, rtol=1e-4, atol=0)  # 1 - p to float32's precision


def test_predict_bf16_logits_same_tokens_and_confidence():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 7, 4096, generator=g) * 4).bfloat16()
    tok, conf = predict(logits, exclude=5)
    want_tok, want_conf = float64_predict(logits, exclude=5)
    assert torch.equal(tok, want_tok)
    torch.testing.assert_close(conf, want_conf, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_predict_never_writes_the_callers_logits(dtype, temperature):
    logits = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    logits[..., 3] = 50.0  # the excluded token would win everywhere
    before = logits.clone()
    tok, _ = predict(logits, temperature, torch.Generator().manual_seed(2), exclude=3)
    assert torch.equal(logits, before)
    assert not (tok == 3).any()


def test_testbed_decoding_unchanged_by_float32_confidence(monkeypatch):
    """Every mode on the shipped testbed models, batch 1 and 4: the same tokens and NFE as with the
    float64 softmax."""
    import infer.ar
    import infer.d2f_decoder
    import infer.fast_dllm
    import infer.vanilla
    from d2f.data.gsm8k import load_gsm8k
    from d2f.data.tokenizer import prompt_ids
    from infer.api import DecodeConfig, generate, load
    from infer.bench import MODES

    problems = load_gsm8k("testbed", split="test", limit=4)
    for name in ("vanilla", "fast-dllm-prefix", "fast-dllm-dual", "d2f", "ar"):
        cfg = DecodeConfig(**MODES[name])
        model, tok = load(None, cfg.mode)
        prompts = [prompt_ids(tok, p["question"]) for p in problems]
        for bs in (1, 4):
            new = [(r.token_ids, r.nfe) for r in generate(model, tok, prompts, cfg, batch_size=bs)]
            with monkeypatch.context() as m:
                for mod in (infer.ar, infer.d2f_decoder, infer.fast_dllm, infer.vanilla):
                    m.setattr(mod, "predict", float64_predict)
                old = [(r.token_ids, r.nfe) for r in generate(model, tok, prompts, cfg, batch_size=bs)]
            assert new == old, (name, bs)
