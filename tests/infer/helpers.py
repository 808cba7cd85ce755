"""Shared helpers for the inference tests: random tiny models whose logits are peaked enough to
make decoding non-trivial (the default init gives near-uniform logits), fake models with
controlled logits."""
from __future__ import annotations

import contextlib
import threading
import time

import torch
from torch import nn

from d2f.models.common import RMSNorm


def random_model(name: str = "tiny-llada", seed: int = 0, std: float = 0.4, dtype=torch.float64, **overrides):
    """A preset tiny model in float64 with N(0, std) weights, RMSNorm weights 1, biases N(0, std)."""
    from d2f.models import build_model, preset_config
    cfg = preset_config(name).replace(**overrides)
    model = build_model(cfg, dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed)
    norms = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    with torch.no_grad():
        for p in model.parameters():
            if id(p) in norms:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * std)
    return model.eval()


@contextlib.contextmanager
def slow_forwards(model, seconds: float):
    """Every forward of `model` sleeps `seconds` and is counted (yields the count as a one-item list): a decode
    then outlives a client's hang-up on any machine, where the tiny testbed alone can finish its whole answer
    between two round trips, and a test can tell how many forwards ran."""
    count = [0]

    def hook(module, args):
        count[0] += 1
        time.sleep(seconds)
    handle = model.register_forward_pre_hook(hook)
    try:
        yield count
    finally:
        handle.remove()


def wait_freed(engine, timeout: float) -> None:
    """Wait up to `timeout` seconds for a started engine to hold no request and no lane (a row freed after a
    client left); the caller asserts the state."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (engine.requests != 0 or engine.lanes):
        time.sleep(0.05)

class ScriptedDLM(nn.Module):
    """A fake diffusion LM: at answer position j (buffer index prompt_len + j) it predicts
    `script[j]` with logit margin `margin` (one float, or one per position) over all other tokens,
    whatever the context. Lets tests place EOS and set confidences where they want
    (margin 10 -> p = 0.994, margin 2 -> p = 0.055 with 128 tokens)."""

    def __init__(self, base, script: list[int], prompt_len: int, margin: float | list[float] = 10.0):
        super().__init__()
        self.config = base.config
        self.inner = base
        self.script = torch.tensor(script)
        self.prompt_len = prompt_len
        margins = margin if isinstance(margin, list) else [margin] * len(script)
        self.margin = torch.tensor(margins, dtype=torch.float64)
        self.calls = 0

    def forward(self, input_ids, position_ids=None, mask=None, cache=None, offset=0):
        self.calls += 1
        B, T = input_ids.shape
        V = self.config.embedding_size
        logits = torch.zeros(B, T, V, dtype=torch.float64)
        idx = torch.arange(offset, offset + T) - self.prompt_len + self.config.logits_shift
        ok = (idx >= 0) & (idx < len(self.script))
        j = idx.clamp(0, len(self.script) - 1)
        tok = torch.where(ok, self.script[j], torch.zeros_like(idx))
        logits[:, torch.arange(T), tok] = torch.where(ok, self.margin[j], torch.zeros_like(self.margin[j]))
        return logits


class Running:
    """uvicorn on a free localhost port, in a thread."""

    def __init__(self, engine, name="testbed"):
        import uvicorn

        from infer.serve import Server, create_app
        self.engine = engine
        self.server = uvicorn.Server(uvicorn.Config(create_app(Server(engine, name)), host="127.0.0.1", port=0,
                                                    log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        import openai
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=120)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.engine.close()
