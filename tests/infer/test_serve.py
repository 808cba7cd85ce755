"""The OpenAI-compatible server (`infer.serve`) on a real uvicorn socket, driven by the `openai` client:
concurrent requests that join a running D2F batch get exactly the answer `infer.api.generate` gives
each prompt alone; streaming, stop strings, disconnects and every bad request."""
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from infer.api import DecodeConfig, encode_prompts, format_prompt, generate, load  # noqa: E402
from infer.engine import Engine, Request  # noqa: E402
from helpers import Running, slow_forwards, wait_freed  # noqa: E402

QUESTIONS = ["Tom has 3 apples and buys 4 more. How many apples does he have?",
             "A box holds 12 pens. Sam buys 5 boxes and gives away 7 pens. How many pens does he have left?",
             "Lily reads 15 pages a day for 6 days. How many pages does she read?",
             "There are 40 birds on a tree. 13 fly away and 8 more land. How many birds are there now?",
             "Max earns 9 dollars an hour and works 7 hours. How much does he earn?",
             "A farmer has 25 cows and sells 11. How many cows are left?"]
CFG = DecodeConfig(mode="d2f", max_new_tokens=64, block_size=16, tau_add=0.7, tau_act=0.95, tau_conf=0.9)


@pytest.fixture(scope="module")
def server(student):
    model, tok = student
    with Running(Engine(model, tok, CFG, max_batch=8).start()) as s:
        yield s


def run_all(engine, prompts: list[list[int]], cfg, max_tokens: int, timeout: float = 120) -> list[dict]:
    """Submit every prompt at once to a started engine, wait for each one's final event, close the engine."""
    finals, done = [None] * len(prompts), threading.Semaphore(0)

    def emit(i):
        def f(ev):
            if ev["type"] in ("done", "error"):
                finals[i] = ev
                done.release()
        return f
    try:
        for i, p in enumerate(prompts):
            engine.submit(Request(p, cfg, max_tokens, emit(i)))
        for _ in prompts:
            assert done.acquire(timeout=timeout)
    finally:
        engine.close()
    return finals


def offline(model, tok, text, cfg=CFG, max_tokens=None):
    cfg = cfg if max_tokens is None else DecodeConfig(**{**cfg.__dict__, "max_new_tokens": max_tokens})
    [r] = generate(model, tok, [text], cfg)
    return r


def test_concurrent_requests_equal_offline_generate_alone(server, student):
    """Requests arrive while others decode (they join the running batch at the next forward), with
    different prompt lengths and budgets; every answer is the one each prompt gets alone."""
    model, tok = student
    texts = [format_prompt(tok, q) for q in QUESTIONS]
    budgets = [64, 32, 64, 48, 64, 16]
    before = dict(server.engine.stats)

    def ask(i):
        time.sleep(0.05 * i)  # staggered: most join a batch that is already running
        r = server.client.completions.create(model="testbed", prompt=texts[i], max_tokens=budgets[i])
        return r.choices[0].text, r.usage.completion_tokens, r.usage.model_extra["nfe"], r.choices[0].finish_reason

    # 30 ms forwards: each answer outlives the 0.25 s of staggering on any machine, so the requests overlap
    with slow_forwards(server.engine.model, 0.03), ThreadPoolExecutor(len(texts)) as pool:
        got = list(pool.map(ask, range(len(texts))))
    nfe_total = 0
    for i, (text, n, nfe, finish) in enumerate(got):
        ref = offline(model, tok, texts[i], max_tokens=-(-budgets[i] // 16) * 16)
        assert text == ref.text, i
        assert n == ref.num_tokens and nfe == ref.nfe, i
        assert finish == ("stop" if ref.token_ids[-1] == model.config.eos_token_id else "length")
        nfe_total += nfe
    forwards = server.engine.stats["forwards"] - before["forwards"]
    assert forwards < nfe_total  # forwards were shared: the requests decoded in one batch


def test_chat_and_stream_chunks_build_the_final_text(server, student):
    model, tok = student
    msgs = [{"role": "user", "content": QUESTIONS[0]}]
    full = server.client.chat.completions.create(model="testbed", messages=msgs, max_tokens=64)
    ref = offline(model, tok, format_prompt(tok, QUESTIONS[0]))
    assert full.choices[0].message.content == ref.text
    pieces, usage = [], None
    for ch in server.client.chat.completions.create(model="testbed", messages=msgs, max_tokens=64, stream=True,
                                                    stream_options={"include_usage": True}):
        if ch.choices and ch.choices[0].delta.content:
            pieces.append(ch.choices[0].delta.content)
        if ch.usage is not None:
            usage = ch.usage
    assert "".join(pieces) == ref.text and len(pieces) > 1
    assert usage.completion_tokens == ref.num_tokens and usage.model_extra["nfe"] == ref.nfe


def test_stop_string_cuts_text_and_stream(server, student):
    model, tok = student
    text = format_prompt(tok, QUESTIONS[1])
    ref = offline(model, tok, text).text
    stop = ref.split()[2]  # a word from the middle of the answer
    r = server.client.completions.create(model="testbed", prompt=text, max_tokens=64, stop=[stop])
    assert r.choices[0].text == ref[:ref.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in server.client.completions.create(
        model="testbed", prompt=text, max_tokens=64, stop=stop, stream=True) if c.choices)
    assert streamed == ref[:ref.index(stop)]


def test_view_chunks_show_masks_filling(server, student):
    model, tok = student
    body = {"prompt": format_prompt(tok, QUESTIONS[2]), "max_tokens": 64, "stream": True, "view": True}
    views = []
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                ev = json.loads(line[6:])
                if "d2f_view" in ev:
                    views.append(ev["d2f_view"])
    masks = [sum(p is None for p in v["pieces"]) for v in views]
    assert len(views) > 2 and masks[0] > masks[-1]
    assert all(set(v["blocks"]) <= {"semi", "active", "finished", "cached"} for v in views)
    assert views[-1]["step"] == len(views)


def test_client_that_leaves_frees_its_row(server, student):
    """Slowed forwards: the row is freed before the forwards the whole answer takes have run."""
    model, tok = student
    one_per_forward = {"tau_conf": 1.0, "tau_add": 1.0, "tau_act": 1.0}
    full = offline(model, tok, format_prompt(tok, QUESTIONS[3]), DecodeConfig(**{**CFG.__dict__, **one_per_forward}),
                   max_tokens=448)
    body = {"prompt": format_prompt(tok, QUESTIONS[3]), "max_tokens": 448, "stream": True, "decode": one_per_forward}
    with slow_forwards(server.engine.model, 0.2) as forwards:
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break  # first chunk, then hang up
        wait_freed(server.engine, 5)
        assert server.engine.requests == 0 and not server.engine.lanes
        assert forwards[0] < full.nfe


def test_models_and_health(server):
    assert [m.id for m in server.client.models.list().data] == ["testbed"]
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["mode"] == "d2f"


BAD = [  # (body or raw bytes, status, words in the message)
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    ({"prompt": "hi", "model": "gpt-4"}, 404, "'gpt-4' does not exist"),
    ({"prompt": "hi", "temperature": -1}, 400, "temperature must be"),
    ({"prompt": "hi", "temperature": "hot"}, 400, "temperature must be"),
    ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens must be an integer >= 1"),
    ({"prompt": "hi", "max_tokens": 1.5}, 400, "max_tokens must be an integer"),
    ({"prompt": "hi", "max_tokens": 100000}, 400, "context"),
    ({"prompt": ""}, 400, "is empty"),
    ({"prompt": 5}, 400, "prompt must be"),
    ({"prompt": [10 ** 9]}, 400, "outside the model's vocabulary"),
    ({}, 400, "prompt must be"),
    ({"prompt": "hi", "n": 2}, 400, "n must be 1"),
    ({"prompt": "hi", "stream": "yes"}, 400, "stream must be"),
    ({"prompt": "hi", "stop": 3}, 400, "stop must be"),
    ({"prompt": "hi", "seed": -1}, 400, "seed must be"),
    ({"prompt": "hi", "decode": {"tau_conf": 2}}, 400, "tau_conf"),
    ({"prompt": "hi", "decode": {"tau_conf": "x"}}, 400, "tau_conf"),
    ({"prompt": "hi", "decode": {"steps": 8}}, 400, "does not apply to mode 'd2f'"),
    ({"prompt": "hi", "decode": {"mode": "vanilla"}}, 400, "mode 'd2f'"),
    ({"prompt": "hi", "decode": {"max_new_tokens": 8}}, 400, "use max_tokens"),
    ({"prompt": "hi", "decode": {"nonsense": 1}}, 400, "nonsense"),
    ({"prompt": "hi", "decode": [1]}, 400, "decode must be an object"),
]


@pytest.mark.parametrize("body,status,words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_requests_get_openai_errors(server, body, status, words):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + "/v1/completions", timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["type"]


@pytest.mark.parametrize("messages,words", [([], "non-empty list"), ([{"role": "robot", "content": "x"}], "role"),
                                            ([{"role": "user", "content": 3}], "string content")])
def test_bad_chat_messages(server, messages, words):
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": messages}, timeout=30)
    assert r.status_code == 400 and words in r.json()["error"]["message"]


def test_full_queue_is_429(student):
    model, tok = student
    engine = Engine(model, tok, CFG, max_queue=1)  # not started: the first request stays queued
    engine.submit(Request([1, 2, 3], CFG, 8, lambda ev: None))
    with Running(engine) as s:
        with pytest.raises(openai.RateLimitError, match="limit of 1 concurrent"):
            s.client.completions.create(model="testbed", prompt="hi", max_tokens=16)


@pytest.mark.parametrize("mode", ["fast-dllm", "vanilla", "ar"])
def test_other_modes_equal_offline(mode):
    """AR joins the running batch at the next token, vanilla and Fast-dLLM at the next block boundary. The
    first request starts alone, the others arrive while it decodes; all get the offline answers (engine API)."""
    model, tok = load(None, mode)
    diffusion = {"block_size": 16} | ({"cache": "dual"} if mode == "fast-dllm" else {"steps": 32} if mode == "vanilla"
                                      else {})
    cfg = DecodeConfig(mode=mode, max_new_tokens=32, **(diffusion if mode != "ar" else {}))
    engine = Engine(model, tok, cfg, max_batch=4).start()
    texts = [format_prompt(tok, q) for q in QUESTIONS[:4]]
    budgets = [32, 32, 32, 32] if mode != "ar" else [32, 20, 32, 7]
    events = [[] for _ in texts]
    done = threading.Semaphore(0)
    started = threading.Event()

    def emit(i):
        def f(ev):
            events[i].append(ev)
            started.set()
            if ev["type"] in ("done", "error"):
                done.release()
        return f
    try:
        engine.submit(Request(encode_prompts(tok, [texts[0]])[0], cfg, budgets[0], emit(0)))
        assert started.wait(60)  # the first request is decoding: the others join it (or wait for the next wave)
        for i, t in enumerate(texts[1:], 1):
            c = DecodeConfig(**{**cfg.__dict__, "max_new_tokens": budgets[i]})
            engine.submit(Request(encode_prompts(tok, [t])[0], c, budgets[i], emit(i)))
        for _ in texts:
            assert done.acquire(timeout=120)
        forwards = engine.stats["forwards"]
    finally:
        engine.close()
    nfe = 0
    for i, t in enumerate(texts):
        ref = offline(model, tok, t, DecodeConfig(**{**cfg.__dict__, "max_new_tokens": budgets[i]}))
        final = events[i][-1]
        assert final["type"] == "done" and final["text"] == ref.text and final["nfe"] == ref.nfe, i
        assert "".join(ev["text"] for ev in events[i] if ev["type"] == "delta") == ref.text
        nfe += final["nfe"]
    assert forwards < nfe  # the later requests shared the first one's forwards


def test_hf_ar_model_batches_per_wave(student):
    """A Hugging Face causal LM keeps its own cache: its requests decode in waves, still as offline."""
    from test_ar import hf_model
    _, tok = student
    model = hf_model("qwen2")
    cfg = DecodeConfig(mode="ar", max_new_tokens=8)
    assert type(Engine(model, tok, cfg).make_lane(cfg)).__name__ == "WaveLane"
    prompts = [[5, 9, 17, 3, 44, 8], [21, 22], [70, 71, 72, 73]]
    finals = run_all(Engine(model, tok, cfg).start(), prompts, cfg, 8, timeout=60)
    for p, final in zip(prompts, finals):
        [ref] = generate(model, tok, [p], cfg)
        assert final["type"] == "done" and final["token_ids"] == ref.token_ids and final["nfe"] == ref.nfe


@pytest.mark.parametrize("limits,most", [({"max_batch": 2}, 2), ({"max_tokens_in_flight": 300}, 3)])
def test_batch_limits_hold(student, monkeypatch, limits, most):
    """No more than max_batch requests, or max_tokens_in_flight prompt + budget tokens, decode at once
    (a single request over the token limit still runs alone); the others wait and still finish right."""
    from infer import engine as eng
    model, tok = student
    seen = []
    step = eng.StepLane.step

    def spy(self):
        step(self)
        seen.append((len(self.members), sum(len(r.prompt_ids) + r.cfg.max_new_tokens for r in self.members.values())))
    monkeypatch.setattr(eng.StepLane, "step", spy)
    texts = [format_prompt(tok, q) for q in QUESTIONS]
    finals = run_all(Engine(model, tok, CFG, **limits).start(), [encode_prompts(tok, [t])[0] for t in texts], CFG, 64)
    assert max(n for n, _ in seen) == most
    if "max_tokens_in_flight" in limits:
        assert all(tokens <= 300 or n == 1 for n, tokens in seen)
    for i, t in enumerate(texts):
        assert finals[i]["type"] == "done" and finals[i]["text"] == offline(model, tok, t).text
