"""The lm-evaluation-harness model `d2f`: generate_until (batching, `until`, `max_gen_toks`, temperature) on
fake request objects, so it runs without lm-eval and without network; registration when lm-eval is there."""
from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch

import infer.api
from d2f.errors import UserError
from d2f.models import build_model, preset_config, save_pretrained
from infer.api import DecodeConfig, Result, generate
from infer.lm_eval_adapter import D2FLM, LOGLIKELIHOOD_ERROR, cut_at_stop


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    from d2f.data.gsm import make_problems
    from d2f.data.tokenizer import train_tokenizer

    problems = make_problems("train", 200, seed=0)
    return train_tokenizer([p["question"] for p in problems] + [p["answer"] for p in problems], vocab_size=300)


def tiny_model(seed=0):
    cfg = preset_config("tiny-llada").replace(vocab_size=300, embedding_size=300, mask_token_id=2, eos_token_id=1,
                                              pad_token_id=0)
    return build_model(cfg, dtype=torch.float32, seed=seed).eval()


def request(context: str, **gen_kwargs):
    return SimpleNamespace(args=(context, gen_kwargs))


class FakeGenerate:
    """Stands in for infer.api.generate: answers every prompt with `text` (token ids = its encoding)."""

    def __init__(self, text: str):
        self.text, self.calls = text, []

    def __call__(self, model, tokenizer, prompts, cfg, *, batch_size=None, **kw):
        self.calls.append((list(prompts), cfg, batch_size))
        ids = tokenizer(self.text, add_special_tokens=False)["input_ids"]
        return [Result(text=f"{p} => {self.text}", token_ids=ids, num_tokens=len(ids), nfe=1,
                       tokens_per_forward=len(ids), wall_time=0.1, tokens_per_s=1.0) for p in prompts]


def test_generate_until_batches_groups_and_cuts_at_stop_strings(monkeypatch):
    fake = FakeGenerate("3 + 4 = 7\n#### 7\n\nQuestion: more")
    monkeypatch.setattr(infer.api, "generate", fake)
    lm = D2FLM(model=tiny_model(), tokenizer=tiny_tokenizer(), mode="d2f", batch_size=2, max_new_tokens=64,
               block_size=16)
    greedy = {"until": ["Question:", "</s>"], "do_sample": False, "temperature": 0.0, "max_gen_toks": 256}
    reqs = [request(f"q{i}", **greedy) for i in range(3)] + [request("hot", until="7", do_sample=True,
                                                                     temperature=0.5)]
    out = lm.generate_until(reqs)
    assert out[:3] == [f"q{i} => 3 + 4 = 7\n#### 7\n\n" for i in range(3)]
    assert out[3] == "hot => 3 + 4 = "  # a single string for `until` works too
    # same gen_kwargs are decoded together, batch_size at a time; the sampling request on its own
    assert [(c[0], c[2]) for c in fake.calls] == [(["q0", "q1"], 2), (["q2"], 1), (["hot"], 1)]
    assert fake.calls[0][1].temperature == 0.0 and fake.calls[2][1].temperature == 0.5
    assert fake.calls[0][1].max_new_tokens == 64 and fake.calls[0][1].block_size == 16  # the model_args' canvas


def test_max_gen_toks_caps_the_continuation(monkeypatch):
    tok = tiny_tokenizer()
    fake = FakeGenerate("Mia has 12 apples and buys 3 more.")
    monkeypatch.setattr(infer.api, "generate", fake)
    lm = D2FLM(model=tiny_model(), tokenizer=tok, mode="d2f", max_new_tokens=32, block_size=16)
    [out] = lm.generate_until([request("q", until=[], max_gen_toks=3)])
    ids = tok(fake.text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 3 and out == tok.decode(ids[:3], skip_special_tokens=True)


def test_generate_until_through_the_real_engine_matches_generate():
    model, tok = tiny_model(seed=3), tiny_tokenizer()
    contexts = ["Question: Tom has 3 apples.\nAnswer:", "Question: Mia reads 12 pages a day for 4 days.\nAnswer:",
                "Question: 5 + 9?\nAnswer:"]
    lm = D2FLM(model=model, tokenizer=tok, mode="fast-dllm", cache="dual", batch_size=2, max_new_tokens=16,
               block_size=8)
    out = lm.generate_until([request(c, until=["Question:"], max_gen_toks=256) for c in contexts])
    cfg = DecodeConfig(mode="fast-dllm", cache="dual", max_new_tokens=16, block_size=8)
    alone = [cut_at_stop(r.text, ["Question:"]) for r in generate(model, tok, contexts, cfg, batch_size=1)]
    assert out == alone  # batching (left padding) does not change answers


def test_loglikelihood_is_refused_clearly():
    lm = D2FLM(model=tiny_model(), tokenizer=tiny_tokenizer(), mode="vanilla", max_new_tokens=16, block_size=8)
    with pytest.raises(NotImplementedError, match="loglikelihood"):
        lm.loglikelihood([request("a", b=1)])
    with pytest.raises(NotImplementedError, match="ELBO"):
        lm.loglikelihood_rolling([request("a")])
    assert "generation tasks" in LOGLIKELIHOOD_ERROR


def test_chat_template_for_apply_chat_template_runs():
    tok = tiny_tokenizer()
    lm = D2FLM(model=tiny_model(), tokenizer=tok, mode="d2f", max_new_tokens=16, block_size=8)
    assert lm.chat_template(False) == "" and lm.chat_template(True) == tok.chat_template
    text = lm.apply_chat_template([{"role": "user", "content": "Question: 2 + 2?"}])
    assert text == "<|user|>\nQuestion: 2 + 2?\n<|assistant|>\n"


def test_bad_model_args_are_named():
    with pytest.raises(ValueError, match="tau_ad"):
        D2FLM(model=tiny_model(), tokenizer=tiny_tokenizer(), tau_ad=0.5)
    with pytest.raises(ValueError, match="auto"):
        D2FLM(model=tiny_model(), tokenizer=tiny_tokenizer(), batch_size="auto")
    with pytest.raises(ValueError, match="tokenizer"):
        D2FLM(model=tiny_model())


def test_cuda_graphs_and_compile_model_args_reach_load():
    from torch._dynamo.eval_frame import OptimizedModule
    from infer.graphs import StaticForward
    lm = D2FLM(mode="d2f", cuda_graphs="true", compile=True, max_new_tokens=16, block_size=8)
    assert isinstance(lm.model, StaticForward) and isinstance(lm.model.model, OptimizedModule)
    assert not isinstance(D2FLM(mode="d2f", compile="false", max_new_tokens=16, block_size=8).model, OptimizedModule)
    with pytest.raises(UserError, match="d2f compile: expected true/false, got 'yes please'"):
        D2FLM(mode="d2f", compile="yes please")
    with pytest.raises(UserError, match="wrap an already loaded one yourself"):
        D2FLM(model=tiny_model(), tokenizer=tiny_tokenizer(), compile=True)


def test_registered_with_lm_eval_and_built_from_model_args(tmp_path):
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is optional (pip install -e '.[eval]')")
    from lm_eval.api.registry import get_model

    assert get_model("d2f") is D2FLM
    ckpt = tmp_path / "ckpt"
    save_pretrained(tiny_model(), ckpt)
    tiny_tokenizer().save_pretrained(str(ckpt))
    lm = get_model("d2f").create_from_arg_string(f"model={ckpt},mode=d2f,max_new_tokens=16,block_size=4,tau_add=0.5",
                                                 {"batch_size": 2, "device": "cpu"})
    assert (lm.cfg.mode, lm.cfg.max_new_tokens, lm.cfg.block_size, lm.cfg.tau_add) == ("d2f", 16, 4, 0.5)
    assert lm.batch_size_ == 2
    from lm_eval.api.instance import Instance

    reqs = [Instance("generate_until", {}, ("Question: 2 + 2?\nAnswer:", {"until": ["Question:"]}), i)
            for i in range(2)]
    out = lm.generate_until(reqs)
    assert len(out) == 2 and all(isinstance(o, str) for o in out)
    assert lm_eval.__version__


def test_lm_eval_runs_a_local_gsm8k_task_end_to_end(tmp_path, monkeypatch):
    """The harness's own gsm8k task (prompts, few-shot, stop strings, scoring) on local files, offline."""
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is optional (pip install -e '.[eval]')")
    import json
    from pathlib import Path

    from lm_eval.tasks import TaskManager

    from d2f.data.gsm import make_problems

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # the json files are local: no network

    for split, n in (("test", 3), ("train", 10)):
        rows = make_problems(split, n, seed=0)
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps({"question": p["question"], "answer": p["answer"]})
                                                         + "\n" for p in rows))
    gsm8k_yaml = Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml"
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "gsm8k_local.yaml").write_text(
        f"include: {gsm8k_yaml}\ntask: gsm8k_local\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'test.jsonl'}\n    train: {tmp_path / 'train.jsonl'}\n")
    lm = D2FLM(model=tiny_model(), tokenizer=tiny_tokenizer(), mode="d2f", max_new_tokens=16, block_size=8,
               batch_size=2)
    out = lm_eval.simple_evaluate(model=lm, tasks=["gsm8k_local"], num_fewshot=1,
                                  task_manager=TaskManager(include_path=str(tmp_path / "tasks")))
    res = out["results"]["gsm8k_local"]
    assert res["exact_match,strict-match"] == 0.0  # a random tiny model, but every request was answered
    [samples] = [out["samples"]["gsm8k_local"]]
    assert {s["doc_id"] for s in samples} == {0, 1, 2}  # one entry per document and filter
    assert all(isinstance(s["resps"][0][0], str) for s in samples)
