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
