"""D2F pipelined decoding: exact cache == recompute-everything reference; the degenerate
settings; EOS handling; block-state rules."""
import pytest

from helpers import ScriptedDLM, random_model
from infer.api import DecodeConfig, generate

PROMPTS = [[5, 9, 17, 3, 44, 8, 2], [21, 22, 23]]


@pytest.mark.parametrize("name", ["tiny-llada", "tiny-dream", "tiny-llada-gqa"])
@pytest.mark.parametrize("taus", [(0.7, 0.95, 0.9), (0.1, 0.5, 0.3), (0.0, 0.0, 0.5), (0.5, 0.9, 1.0)])
def test_cache_equals_recompute(name, taus):
    tau_add, tau_act, tau_conf = taus
    model = random_model(name, seed=7)
    base = dict(mode="d2f", max_new_tokens=24, block_size=4, tau_add=tau_add, tau_act=tau_act, tau_conf=tau_conf)
    ref = generate(model, None, PROMPTS, DecodeConfig(cache="none", **base), trace=True)
    got = generate(model, None, PROMPTS, DecodeConfig(**base), trace=True)
    for r, g in zip(ref, got):
        assert g.token_ids == r.token_ids
        assert g.nfe == r.nfe
        assert [s["committed"] for s in g.trace] == [s["committed"] for s in r.trace]
        assert [s["blocks"] for s in g.trace] == [s["blocks"] for s in r.trace]


@pytest.mark.parametrize("name", ["tiny-llada", "tiny-dream", "tiny-llada-gqa"])
@pytest.mark.parametrize("taus", [(0.7, 0.95, 0.9), (0.1, 0.5, 0.3), (0.5, 0.9, 1.0)])
def test_per_sample_windows_equal_union_window(name, taus):
    """windows="rows" (each sample forwards its own window, infer.batch.forward_rows) commits what the
    union window commits, step by step, in a batch whose samples progress at different speeds."""
    tau_add, tau_act, tau_conf = taus
    model = random_model(name, seed=7)
    cfg = DecodeConfig(mode="d2f", max_new_tokens=24, block_size=4, tau_add=tau_add, tau_act=tau_act, tau_conf=tau_conf)
    prompts = PROMPTS + [[7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]]
    ref = generate(model, None, prompts, cfg, trace=True)
    got = generate(model, None, prompts, cfg, trace=True, windows="rows")
    for r, g in zip(ref, got):
        assert g.token_ids == r.token_ids and g.nfe == r.nfe
        assert [s["committed"] for s in g.trace] == [s["committed"] for s in r.trace]
        assert [s["blocks"] for s in g.trace] == [s["blocks"] for s in r.trace]


def test_parallel_pipeline_actually_overlaps_blocks():
    """With low thresholds several blocks are in flight and a forward commits many tokens."""
    model = random_model("tiny-llada", seed=7)
    cfg = DecodeConfig(mode="d2f", max_new_tokens=24, block_size=4, tau_add=0.1, tau_act=0.5, tau_conf=0.3)
    [res] = generate(model, None, [PROMPTS[0]], cfg, trace=True)
    in_flight = [sum(st in ("semi", "active") for st in s["blocks"]) for s in res.trace]
    assert max(in_flight) >= 2
    assert res.tokens_per_forward > 1.0


def test_tau_one_is_one_token_at_a_time_block_decoding():
    model = random_model("tiny-llada", seed=8)
    G, Bs = 16, 4
    cfg = DecodeConfig(mode="d2f", max_new_tokens=G, block_size=Bs, tau_add=1.0, tau_act=1.0, tau_conf=1.0)
    [res] = generate(model, None, [PROMPTS[0]], cfg, trace=True)
    assert all(len(s["committed"]) == 1 for s in res.trace)
    decoded = [p for s in res.trace for p in s["committed"]]
    assert res.nfe == len(decoded) == len(set(decoded))
    # blocks strictly in order: every position of block k before any of block k+1
    assert [p // Bs for p in decoded] == sorted(p // Bs for p in decoded)
    assert all(sum(st in ("semi", "active") for st in s["blocks"]) <= 1 for s in res.trace)
    if model.config.eos_token_id not in res.token_ids:
        assert res.nfe == G


def scripted(script, prompt_len, name="tiny-llada", margin=10.0):
    return ScriptedDLM(random_model(name, seed=0), script, prompt_len, margin)


@pytest.mark.parametrize("name", ["tiny-llada", "tiny-dream"])
def test_eos_stops_adding_blocks_and_cuts_answer(name):
    eos = 1
    script = [10, 11, 12, 13, 14, eos, 20, 21] + [30] * 8
    model = scripted(script, prompt_len=3, name=name)
    cfg = DecodeConfig(mode="d2f", max_new_tokens=16, block_size=4, tau_add=0.7, tau_act=0.95, tau_conf=0.9)
    [res] = generate(model, None, [[5, 6, 7]], cfg, trace=True)
    assert res.token_ids == [10, 11, 12, 13, 14, eos]
    # step 1: block 0 all confident -> finished, block 1 added; step 2: block 1 commits the EOS; done
    assert res.nfe == 2 == model.calls
    assert res.trace[-1]["blocks"] == ["cached", "finished"]  # block 0 was written by forward 2


def test_semi_activated_block_commits_only_confident_tokens():
    """Block 0: positions 0, 1 confident, 2, 3 not; block 1: position 4 confident, 5-7 not.
    tau_add 0.25 adds block 1 after step 1 (semi: block 0 is at 0.5 < tau_act). A semi block
    commits only above tau_conf; once block 0 is finished, block 1 is fully activated and is
    forced to commit one token per step."""
    hi = 10.0  # distinct low margins (p ~ 0.06) fix the order of forced commits
    model = scripted(list(range(10, 18)), prompt_len=2, margin=[hi, hi, 2.2, 2.0, hi, 2.3, 2.2, 2.1])
    cfg = DecodeConfig(mode="d2f", max_new_tokens=8, block_size=4, tau_add=0.25, tau_act=0.95, tau_conf=0.9)
    [res] = generate(model, None, [[5, 6]], cfg, trace=True)
    assert res.token_ids == list(range(10, 18))
    assert [s["committed"] for s in res.trace] == [[0, 1], [2, 4], [3], [5], [6], [7]]
    assert [s["blocks"] for s in res.trace] == [["active", "semi"], ["active", "semi"], ["finished", "active"],
                                                ["cached", "active"], ["cached", "active"], ["cached", "finished"]]
    assert res.nfe == 6 == model.calls


def test_low_confidence_forced_commit_only_in_fully_activated_block():
    model = scripted([10] * 8, prompt_len=2, margin=2.0)  # p ~ 0.055 < tau_conf
    cfg = DecodeConfig(mode="d2f", max_new_tokens=8, block_size=4, tau_add=0.25, tau_act=0.95, tau_conf=0.9)
    [res] = generate(model, None, [[5, 6]], cfg, trace=True)
    # step 1: block 0 forced one; now at 0.25 -> block 1 added semi; it never commits until
    # block 0 finishes (fraction 1 >= tau_act) -> one token per step throughout
    assert all(len(s["committed"]) == 1 for s in res.trace)
    assert res.nfe == 8
    assert res.trace[0]["blocks"] == ["active", "semi"]
    assert res.trace[3]["blocks"] == ["finished", "active"]
