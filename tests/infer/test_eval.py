"""infer.eval: scoring on real GSM8K answers, throughput counted to the first EOS through the real engine,
NFE per forward, resume after an interruption, and the command line on a tiny checkpoint."""
from __future__ import annotations

import functools
import itertools
import json
from dataclasses import dataclass

import pytest
import torch

from d2f.models import build_model, preset_config, save_pretrained
from infer import eval as E
from infer import prompts as P
from infer.api import DecodeConfig, generate

EOS, PAD, MASK = 1, 0, 2  # the testbed tokenizer's special ids


# ----------------------------------------------------------------------------- fixtures

@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """A 300-token byte-level BPE (the testbed's recipe, smaller), trained in well under a second."""
    from d2f.data.gsm import make_problems
    from d2f.data.tokenizer import train_tokenizer

    problems = make_problems("train", 200, seed=0)
    return train_tokenizer([p["question"] for p in problems] + [p["answer"] for p in problems], vocab_size=300)


def tiny_model(is_causal: bool = False, seed: int = 0):
    cfg = preset_config("tiny-llada").replace(vocab_size=300, embedding_size=300, mask_token_id=MASK,
                                              eos_token_id=EOS, pad_token_id=PAD, is_causal=is_causal)
    return build_model(cfg, dtype=torch.float32, seed=seed).eval()


class Scripted:
    """The real tiny model (so the engine's caches, masks and type checks are exercised) whose logits are
    replaced: answer position j predicts script[j] with a large margin. Counts its forwards."""

    def __init__(self, inner, script: list[int], prompt_len: int):
        self.script, self.prompt_len, self.forwards = torch.tensor(script), prompt_len, 0
        # a causal model's logit at index i predicts token i + 1
        self.shift = 1 if inner.config.is_causal else inner.config.logits_shift
        self.real_forward = inner.forward
        inner.forward = self.forward  # nn.Module.__call__ calls the instance's forward

    def forward(self, input_ids, position_ids=None, mask=None, cache=None, offset=0):
        self.forwards += 1
        logits = self.real_forward(input_ids, position_ids=position_ids, mask=mask, cache=cache, offset=offset)
        T = input_ids.shape[1]
        j = torch.arange(offset, offset + T) - self.prompt_len + self.shift
        ok = (j >= 0) & (j < len(self.script))
        tok = torch.where(ok, self.script[j.clamp(0, len(self.script) - 1)], torch.full_like(j, 3))
        out = torch.zeros_like(logits)
        out[:, torch.arange(T), tok] = 30.0
        return out


def scripted_model(script, prompt_len, is_causal=False):
    model = tiny_model(is_causal=is_causal)
    return model, Scripted(model, script, prompt_len)


def fake_clock(step: float = 0.5):
    """Every reading advances by `step`: each generate call then takes exactly `step` seconds."""
    return functools.partial(next, itertools.count(0.0, step))


@dataclass
class FakeResult:
    text: str
    num_tokens: int = 10
    nfe: int = 4
    tokens_per_forward: float = 2.5
    wall_time: float = 0.1


# ----------------------------------------------------------------------------- scoring

def _real100():
    from d2f.data.gsm8k import load_gsm8k

    try:
        return load_gsm8k("real100")
    except FileNotFoundError as err:
        pytest.skip(f"the 100 real GSM8K problems are not available: {err}")


def test_real100_gold_answer_scores_one_and_a_wrong_one_zero():
    problems = _real100()
    assert len(problems) == 100
    for i, p in enumerate(problems):
        gold = E.make_record(i, p, FakeResult(p["answer"]), 0.1, batch_id=i, batch_size=1)
        assert gold["correct"] is True and gold["extracted"] == p["final"], p
        # a base model that keeps going after its answer writes the next "Question:" with other numbers
        rambling = p["answer"] + "\n\nQuestion: Tom has 3 apples and buys 987654 more.\nAnswer: #### 987657"
        assert E.make_record(i, p, FakeResult(rambling), 0.1, i, 1)["correct"] is True
        wrong_final = str(int(float(p["final"])) + 1)
        wrong = p["answer"].rsplit("####", 1)[0] + f"#### {wrong_final}"
        rec = E.make_record(i, p, FakeResult(wrong), 0.1, i, 1)
        assert rec["correct"] is False and rec["extracted"] == wrong_final
    s = E.summarize([E.make_record(i, p, FakeResult(p["answer"] if i % 4 else "no idea"), 0.1, i, 1)
                     for i, p in enumerate(problems)])
    assert s["correct"] == 75 and s["accuracy"] == 0.75


def test_cut_at_stop():
    assert P.cut_at_stop("3 + 4 = 7\n#### 7\n\nQuestion: what") == "3 + 4 = 7\n#### 7\n\n"
    assert P.cut_at_stop("#### 7") == "#### 7"


# ----------------------------------------------------------------------------- throughput through the engine

EOS_AT = 5  # the answer's 6th token is EOS
SCRIPT = [10, 11, 12, 13, 14, EOS, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29]  # tokens after EOS must not count
MODES = {
    "vanilla": DecodeConfig(mode="vanilla", max_new_tokens=16, block_size=8, steps=16),
    "fast-dllm-prefix": DecodeConfig(mode="fast-dllm", max_new_tokens=16, block_size=8, cache="prefix"),
    "fast-dllm-dual": DecodeConfig(mode="fast-dllm", max_new_tokens=16, block_size=8, cache="dual"),
    "d2f": DecodeConfig(mode="d2f", max_new_tokens=16, block_size=4, tau_add=0.5),
    "ar": DecodeConfig(mode="ar", max_new_tokens=16),
}


@pytest.mark.parametrize("name", list(MODES))
def test_throughput_counts_answer_tokens_to_first_eos_and_nfe_per_forward(name, tmp_path):
    cfg = MODES[name]
    prompt = [40, 41, 42, 43]
    model, counter = scripted_model(SCRIPT, len(prompt), is_causal=cfg.mode == "ar")
    problems = [{"question": "q", "final": "5"}]
    summary = E.evaluate(model, tiny_tokenizer(), problems, [prompt], cfg, tmp_path, progress=False,
                         clock=fake_clock(0.5))
    [rec] = [json.loads(line) for line in (tmp_path / E.PREDICTIONS).read_text().splitlines()]
    assert rec["tokens"] == EOS_AT + 1 == summary["tokens_total"]
    assert summary["tokens_per_s"] == (EOS_AT + 1) / 0.5
    assert rec["nfe"] == counter.forwards == summary["nfe_total"]  # one NFE per forward pass
    assert summary["tokens_per_forward"] == pytest.approx((EOS_AT + 1) / counter.forwards)
    if cfg.mode == "vanilla":
        assert counter.forwards == cfg.steps
    if cfg.mode == "ar":
        assert counter.forwards == EOS_AT + 1  # one token per forward, none after EOS
    # the engine's own answer: the script up to and including EOS
    [res] = generate(scripted_model(SCRIPT, len(prompt), cfg.mode == "ar")[0], tiny_tokenizer(), [prompt], cfg)
    assert res.token_ids == SCRIPT[:EOS_AT + 1]


# ----------------------------------------------------------------------------- resume

def _problems_and_prompts(n=5):
    from d2f.data.gsm import make_problems

    tok = tiny_tokenizer()
    problems = make_problems("test", n, seed=3)
    return problems, [E.P.build_prompt(tok, p["question"], [], chat="auto") for p in problems]


class Counting:
    """generate, counting calls; raises KeyboardInterrupt on call number `fail_at` (an interruption)."""

    def __init__(self, fail_at: int | None = None):
        self.calls, self.fail_at = 0, fail_at

    def __call__(self, *args, **kw):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        return generate(*args, **kw)


def test_resume_skips_finished_problems_and_gives_the_same_figures(tmp_path):
    problems, prompts = _problems_and_prompts(5)
    model, tok = tiny_model(seed=1), tiny_tokenizer()
    cfg = DecodeConfig(mode="fast-dllm", max_new_tokens=16, block_size=8, cache="dual")
    meta = {"model": "tiny", "data": "generated"}

    full = E.evaluate(model, tok, problems, prompts, cfg, tmp_path / "full", meta=meta, progress=False,
                      clock=fake_clock())

    interrupted = Counting(fail_at=3)
    with pytest.raises(KeyboardInterrupt):
        E.evaluate(model, tok, problems, prompts, cfg, tmp_path / "resumed", meta=meta, progress=False,
                   generate_fn=interrupted, clock=fake_clock())
    pred = tmp_path / "resumed" / E.PREDICTIONS
    assert len(pred.read_text().splitlines()) == 2  # problems 0 and 1 were written before the interruption
    with pred.open("a") as f:  # and the process died while writing problem 2's line
        f.write('{"index": 2, "question": "Mia has')

    resumed = Counting()
    again = E.evaluate(model, tok, problems, prompts, cfg, tmp_path / "resumed", meta=meta, progress=False,
                       generate_fn=resumed, clock=fake_clock())
    assert resumed.calls == 3  # problems 2, 3, 4 only
    assert again == full
    lines = lambda d: [json.loads(x) for x in (tmp_path / d / E.PREDICTIONS).read_text().splitlines()]
    assert [r["output"] for r in lines("resumed")] == [r["output"] for r in lines("full")]
    assert json.loads((tmp_path / "resumed" / E.SUMMARY).read_text())["accuracy"] == full["accuracy"]

    # nothing left to do: no generate call at all
    idle = Counting()
    assert E.evaluate(model, tok, problems, prompts, cfg, tmp_path / "resumed", meta=meta, progress=False,
                      generate_fn=idle, clock=fake_clock()) == full
    assert idle.calls == 0


def test_resume_with_other_settings_is_refused(tmp_path):
    problems, prompts = _problems_and_prompts(2)
    model, tok = tiny_model(), tiny_tokenizer()
    cfg = DecodeConfig(mode="d2f", max_new_tokens=8, block_size=4)
    E.evaluate(model, tok, problems, prompts, cfg, tmp_path, progress=False)
    other = DecodeConfig(mode="d2f", max_new_tokens=8, block_size=4, tau_conf=0.5)
    with pytest.raises(E.RunMismatch, match="tau_conf"):
        E.evaluate(model, tok, problems, prompts, other, tmp_path, progress=False)
    calls = Counting()
    E.evaluate(model, tok, problems, prompts, other, tmp_path, progress=False, overwrite=True, generate_fn=calls)
    assert calls.calls == 2


def test_batched_eval_counts_each_batch_time_once(tmp_path):
    problems, prompts = _problems_and_prompts(5)
    cfg = DecodeConfig(mode="fast-dllm", max_new_tokens=16, block_size=8, cache="prefix")
    s = E.evaluate(tiny_model(), tiny_tokenizer(), problems, prompts, cfg, tmp_path, batch_size=2, progress=False,
                   clock=fake_clock(0.5))
    recs = [json.loads(x) for x in (tmp_path / E.PREDICTIONS).read_text().splitlines()]
    assert [r["batch_size"] for r in recs] == [2, 2, 2, 2, 1]
    assert s["wall_time_total_s"] == 1.5  # three generate calls of 0.5 s
    assert s["tokens_per_s"] == pytest.approx(sum(r["tokens"] for r in recs) / 1.5)
    assert s["latency_p50_s"] == 0.5


# ----------------------------------------------------------------------------- command line

def test_eval_command_on_a_checkpoint_dir_with_k_shot_prompts(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    save_pretrained(tiny_model(seed=2), ckpt)
    tiny_tokenizer().save_pretrained(str(ckpt))
    from d2f.data.gsm import make_problems

    data = tmp_path / "probs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in make_problems("test", 4, seed=5)))
    out = tmp_path / "out"
    argv = ["--model", str(ckpt), "--mode", "fast-dllm", "--cache", "dual", "--max-new-tokens", "16",
            "--block-size", "8", "--data", str(data), "--shots", "1", "--limit", "3", "--batch-size", "2",
            "--output-dir", str(out), "--no-progress"]
    summary = E.main(argv)
    assert summary["n"] == 3
    recs = [json.loads(x) for x in (out / E.PREDICTIONS).read_text().splitlines()]
    assert [r["index"] for r in recs] == [0, 1, 2]
    assert set(recs[0]) >= {"index", "question", "gold", "output", "extracted", "correct", "tokens", "nfe",
                            "wall_time"}
    run = json.loads((out / E.RUN).read_text())
    assert run["decode"]["cache"] == "dual" and run["shots"] == 1 and run["chat"] is True
    assert "accuracy" in capsys.readouterr().out
    # the same command again resumes: nothing is recomputed and the figures are the same
    again = E.main(argv)
    assert {k: again[k] for k in ("accuracy", "tokens_total", "nfe_total")} == \
        {k: summary[k] for k in ("accuracy", "tokens_total", "nfe_total")}


def test_k_shot_prompts_come_from_train_and_never_from_the_evaluated_problems():
    from d2f.data.gsm import make_problems

    tok = tiny_tokenizer()
    problems = make_problems("test", 3, seed=0)
    shots = E.P.select_shots(4, source="testbed", exclude=[p["question"] for p in problems])
    assert len(shots) == 4 and shots == E.P.select_shots(4, source="testbed")  # deterministic
    from d2f.data.gsm8k import load_gsm8k

    train = load_gsm8k("testbed", split="train", limit=E.P.SHOT_POOL)
    train_questions = {p["question"] for p in train}
    assert all(s["question"] in train_questions for s in shots)
    plain = E.P.build_prompt(tok, problems[0]["question"], shots, chat="off")
    assert plain.count("Question:") == 5 and plain.endswith("Answer:") and shots[0]["answer"].strip() in plain
    chat = E.P.build_prompt(tok, problems[0]["question"], shots, chat="auto")
    assert chat.count("<|user|>") == 5 and chat.endswith("<|assistant|>\n")
    # zero-shot chat is exactly the engine's format_prompt of the bare question (the testbed's training format)
    from infer.api import format_prompt

    assert E.P.build_prompt(tok, problems[0]["question"], [], chat="auto") == format_prompt(tok, problems[0]["question"])
    # a shot is never an evaluated problem, even when the evaluated set is the train split itself
    assert not ({s["question"] for s in E.P.select_shots(4, exclude=[p["question"] for p in train[:-4]])}
                - {p["question"] for p in train[-4:]})
    with pytest.raises(ValueError, match="shots"):
        E.P.select_shots(5, exclude=[p["question"] for p in train[:-4]])


def test_incomplete_records_are_dropped_with_a_warning_and_decoded_again(tmp_path, capsys):
    """A predictions.jsonl line that parses but lacks fields (edited by hand, another tool) is not summarised
    (it would fail with a KeyError): it is dropped, said on stderr, and that problem is decoded again."""
    good = {k: 0 for k in E.RECORD_KEYS} | {"index": 1}
    path = tmp_path / E.PREDICTIONS
    path.write_text(json.dumps({"index": 0, "output": "x"}) + "\n" + json.dumps(good) + "\n" + '{"index": 2, "q\n')
    assert list(E.read_predictions(path)) == [1]
    assert "2 unreadable or incomplete line(s) dropped" in capsys.readouterr().err
    assert [json.loads(x)["index"] for x in path.read_text().splitlines()] == [1]
