"""An OpenAI-compatible HTTP server with continuous batching (FastAPI + uvicorn).

    python -m infer.serve                                  # the testbed D2F student on 127.0.0.1:8000
    python -m infer.serve --model GSAI-ML/LLaDA-8B-Instruct --adapter path/to/d2f_lora --device cuda \\
        --dtype bfloat16 --max-new-tokens 256 --block-size 32 --max-batch 32

Endpoints: POST /v1/completions, POST /v1/chat/completions (the model's chat template), GET /v1/models,
GET /health, and GET / (a page that shows a request decoding live). Model, adapter, mode and decode
settings are those of `python -m infer.generate`; they are the defaults of every request.

Per request: `max_tokens`, `temperature` (default: the server's, 0 unless --temperature), `seed`,
`stop`, `stream` (+ `stream_options.include_usage`) and, as an extra body field, `decode`: the mode's
other settings, e.g. {"decode": {"tau_conf": 0.9}} (with the openai client: extra_body=...). The
response's usage carries `nfe`, the forwards that decoded the request. `max_tokens` is rounded up to
whole blocks for decoding and the answer is cut at max_tokens.

Streaming: a diffusion decoder commits tokens out of order. A chunk carries the text that the
committed left-to-right prefix of the answer gained since the last chunk: the concatenated chunks
are always a prefix of the final text, and never change. With `"view": true` in the body each
forward also sends a chunk with an extra `d2f_view` field (the answer with masks, block states).

Errors are OpenAI error objects: 400 for a bad body or value, 404 for an unknown model, 429 when
--max-queue requests are already queued or running; the server never crashes on input.
"""

import argparse
import asyncio
import dataclasses
import json
import math
import sys
import time
import uuid
from pathlib import Path

from d2f.errors import UserError, positive_int, run_main

PAGE = Path(__file__).with_name("static") / "live.html"


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _number(body: dict, name: str, lo: float, hi: float = math.inf):
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise ApiError(400, f"{name} must be a finite number in [{lo}, {hi}], got {v!r}", param=name)
    return v


def _int(body: dict, name: str, lo: int, hi: int | None = None):
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ApiError(400, f"{name} must be an integer {rng}, got {v!r}", param=name)
    return v


class Server:
    """What the routes share: the engine, the tokenizer, the default decode settings."""

    def __init__(self, engine, model_name: str, chat_template: bool = True):
        from infer.api import max_positions
        self.engine, self.tok, self.defaults = engine, engine.tokenizer, engine.defaults
        self.model_name = model_name
        self.chat_template = chat_template
        self.max_positions = max_positions(engine.model)
        self.created = int(time.time())

    # ---- request parsing ----------------------------------------------------------------------
    def config(self, body: dict, n_prompt: int) -> tuple:
        """(DecodeConfig, max_tokens) for a request body: the server's defaults <- the body's values."""
        from d2f.yaml_config import from_dict
        from infer.decode_config import DecodeConfig, check_fields_apply
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise ApiError(404, f"model {model!r} does not exist; this server serves {self.model_name!r} "
                                "(GET /v1/models)", param="model", code="model_not_found")
        d = self.defaults
        max_tokens = _int(body, "max_completion_tokens", 1) or _int(body, "max_tokens", 1) or d.max_new_tokens
        decode = body.get("decode") or {}
        if not isinstance(decode, dict):
            raise ApiError(400, f"decode must be an object of decode settings, got {type(decode).__name__}",
                           param="decode")
        for bad in ("mode", "max_new_tokens"):
            if bad in decode and not (bad == "mode" and decode[bad] == d.mode):
                hint = (f"this server decodes with mode {d.mode!r}" if bad == "mode" else "use max_tokens")
                raise ApiError(400, f"decode.{bad} cannot be set per request: {hint}", param=f"decode.{bad}")
        data = dataclasses.asdict(d)
        data.update(decode)
        temperature, seed = _number(body, "temperature", 0.0, 100.0), _int(body, "seed", 0, 2 ** 63 - 1)
        if temperature is not None:
            data["temperature"] = float(temperature)
        if seed is not None:
            data["seed"] = seed
        # diffusion modes decode whole blocks: round the budget up, cut the answer at max_tokens
        bs = int(data.get("block_size") or d.block_size)
        data["max_new_tokens"] = max_tokens if d.mode == "ar" else -(-max_tokens // bs) * bs
        if self.max_positions is not None and n_prompt + data["max_new_tokens"] > self.max_positions:
            raise ApiError(400, f"the prompt has {n_prompt} tokens and max_tokens {max_tokens} needs "
                                f"{data['max_new_tokens']} more: {n_prompt + data['max_new_tokens']} positions, over "
                                f"the model's context of {self.max_positions}. Shorten the prompt or lower "
                                "max_tokens.", param="max_tokens", code="context_length_exceeded")
        try:
            cfg = from_dict(DecodeConfig, data, where="decode")
            check_fields_apply(cfg.mode, set(decode), where="decode: ")
            cfg.validate()
        except UserError as e:
            raise ApiError(400, str(e), param="decode") from None
        return cfg, max_tokens

    def stops(self, body: dict) -> list[str]:
        stop = body.get("stop")
        if stop is None:
            return []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise ApiError(400, f"stop must be a string or a list of strings, got {body['stop']!r}", param="stop")
        return [s for s in stop if s]

    def encode(self, text: str) -> list[int]:
        from infer.api import encode_prompts
        return encode_prompts(self.tok, [text])[0]

    def completion_prompts(self, body: dict) -> list[list[int]]:
        p = body.get("prompt")
        if isinstance(p, str):
            prompts = [p]
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            prompts = [p]  # token ids
        elif isinstance(p, list) and p and all(isinstance(t, str) for t in p):
            prompts = p
        else:
            raise ApiError(400, "prompt must be a non-empty string, a list of strings, or a list of token ids "
                                f"(got {type(p).__name__})", param="prompt")
        out = []
        for q in prompts:
            ids = self.encode(q) if isinstance(q, str) else q
            if not ids:
                raise ApiError(400, "prompt is empty; give some text", param="prompt")
            vocab = getattr(self.engine.model.config, "vocab_size", None)
            bad = [t for t in ids if t < 0 or (vocab is not None and t >= vocab)]
            if bad:
                raise ApiError(400, f"token id {bad[0]} is outside the model's vocabulary [0, {vocab})", param="prompt")
            out.append(ids)
        return out

    def chat_prompt(self, body: dict) -> list[int]:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise ApiError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
        clean = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), str):
                raise ApiError(400, f"messages[{i}] must be an object with role 'system', 'user' or 'assistant' "
                                    "and a string content", param=f"messages[{i}]")
            clean.append({"role": m["role"], "content": m["content"]})
        if self.chat_template and getattr(self.tok, "chat_template", None):
            try:
                text = self.tok.apply_chat_template(clean, tokenize=False, add_generation_prompt=True)
            except Exception as e:  # a template that refuses the roles (e.g. no system role)
                raise ApiError(400, f"the model's chat template refused these messages: {e}", param="messages")
        else:
            text = "\n".join(m["content"] for m in clean)
        ids = self.encode(text)
        if not ids:
            raise ApiError(400, "the messages are empty; give some text", param="messages")
        return ids


async def read_body(request) -> dict:
    """The request's JSON object, with the fields every endpoint checks the same way."""
    raw = await request.body()
    try:
        body = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    if body.get("n", 1) != 1:
        raise ApiError(400, f"n must be 1 (got {body.get('n')!r}); send several requests instead", param="n")
    if not isinstance(body.get("stream", False), bool):
        raise ApiError(400, f"stream must be true or false, got {body.get('stream')!r}", param="stream")
    return body


def submit(server: Server, body: dict, prompts: list[list[int]], queue: asyncio.Queue) -> list:
    """Queue one engine request per prompt; their events arrive on `queue` as (prompt index, event)."""
    from infer.engine import Overloaded, Request
    loop = asyncio.get_running_loop()
    stop = server.stops(body)
    reqs = []
    for i, ids in enumerate(prompts):
        cfg, max_tokens = server.config(body, len(ids))
        emit = (lambda i: lambda ev: loop.call_soon_threadsafe(queue.put_nowait, (i, ev)))(i)
        reqs.append(Request(ids, cfg, max_tokens, emit, stop=stop, view=bool(body.get("view"))))
    try:
        for r in reqs:
            server.engine.submit(r)
    except Overloaded as e:
        for r in reqs:
            r.cancel()
        raise ApiError(429, str(e), "rate_limit_error", code="rate_limit_exceeded") from None
    return reqs


async def collect(request, reqs: list, queue: asyncio.Queue) -> list[dict]:
    """Wait for every request's final event; cancel them all if the client goes away."""
    done: dict[int, dict] = {}
    while len(done) < len(reqs):
        try:
            i, ev = await asyncio.wait_for(queue.get(), timeout=1.0)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                for r in reqs:
                    r.cancel()
                return []
            continue
        if ev["type"] == "error":
            for r in reqs:
                r.cancel()
            raise ApiError(ev["status"], ev["message"], "server_error" if ev["status"] >= 500 else
                           "invalid_request_error")
        if ev["type"] == "done":
            done[i] = ev
    return [done[i] for i in range(len(reqs))]


def usage(events: list[dict]) -> dict:
    keys = ("prompt_tokens", "completion_tokens", "total_tokens", "nfe")
    return {k: sum(ev["usage"][k] for ev in events) for k in keys}


def reply(head: dict, events: list[dict], chat: bool) -> dict:
    """The non-streaming response object."""
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": ev["text"]},
                    "finish_reason": ev["finish_reason"]} for i, ev in enumerate(events)]
    else:
        choices = [{"index": i, "text": ev["text"], "finish_reason": ev["finish_reason"], "logprobs": None}
                   for i, ev in enumerate(events)]
    return {**head, "object": "chat.completion" if chat else "text_completion", "choices": choices,
            "usage": usage(events)}


def sse(obj: dict) -> str:
    return "data: " + json.dumps(obj) + "\n\n"


async def stream(head: dict, reqs: list, queue: asyncio.Queue, chat: bool, include_usage: bool):
    """The server-sent events of a streaming response; the rows still decoding are freed when it ends."""
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(i: int, text: str | None, finish: str | None, first: bool = False, **extra) -> str:
        if chat:
            delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
            choice = {"index": i, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": i, "text": text or "", "finish_reason": finish, "logprobs": None}
        return sse({**head, "object": obj, "choices": [choice], **extra})

    finished: dict[int, dict] = {}
    try:
        if chat:
            for i in range(len(reqs)):
                yield chunk(i, "", None, first=True)
        while len(finished) < len(reqs):
            i, ev = await queue.get()
            if ev["type"] == "delta":
                yield chunk(i, ev["text"], None)
            elif ev["type"] == "view":
                yield chunk(i, None, None, d2f_view={k: v for k, v in ev.items() if k != "type"})
            elif ev["type"] == "done":
                finished[i] = ev
                yield chunk(i, None, ev["finish_reason"], d2f={"nfe": ev["nfe"], "wall_time": ev["wall_time"],
                                                               "completion_tokens": ev["usage"]["completion_tokens"]})
            else:
                yield sse(ApiError(ev["status"], ev["message"], "server_error").body())
                return
        if include_usage:
            yield sse({**head, "object": obj, "choices": [], "usage": usage(list(finished.values()))})
        yield "data: [DONE]\n\n"
    finally:  # the client left (or the stream ended): free the rows still decoding
        for r in reqs:
            if not r.done:
                r.cancel()


async def handle(server: Server, request, chat: bool):
    """POST /v1/completions (chat=False) and /v1/chat/completions (chat=True)."""
    from fastapi.responses import StreamingResponse
    body = await read_body(request)
    prompts = [server.chat_prompt(body)] if chat else server.completion_prompts(body)
    queue: asyncio.Queue = asyncio.Queue()
    reqs = submit(server, body, prompts, queue)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    head = {"id": rid, "created": int(time.time()), "model": server.model_name}
    if not body.get("stream"):
        return reply(head, await collect(request, reqs, queue), chat)
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    return StreamingResponse(stream(head, reqs, queue, chat, include_usage), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def create_app(server: Server):
    """The FastAPI app: errors as OpenAI error objects, and the routes."""
    from fastapi import FastAPI, Request as HttpRequest
    from fastapi.responses import HTMLResponse, JSONResponse

    engine = server.engine
    app = FastAPI(title="d2f", docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(UserError)
    async def user_error(_, e: UserError):  # a check of ours refused a value from the request
        return JSONResponse(ApiError(400, str(e)).body(), status_code=400)

    @app.exception_handler(Exception)
    async def any_error(_, e: Exception):  # a bug: say so in OpenAI's format, keep serving
        return JSONResponse(ApiError(500, f"internal error: {type(e).__name__}: {e}", "server_error").body(), 500)

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        return await handle(server, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        return await handle(server, request, chat=True)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "d2f"}]}

    @app.get("/health")
    async def health():
        d = server.defaults
        return {"status": "ok", "model": server.model_name, "mode": d.mode, "requests": engine.requests,
                "max_batch": engine.max_batch, "block_size": d.block_size, "max_new_tokens": d.max_new_tokens,
                **engine.stats}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        if not PAGE.is_file():
            raise ApiError(404, "the live page is not installed (infer/static/live.html)", code="not_found")
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.on_event("shutdown")
    async def shutdown():
        engine.close()

    return app


def build(args: argparse.Namespace):
    """Load the model and start the engine; returns the app (no server yet)."""
    from infer.api import DECODE_SDPA_KERNELS, load
    from infer.cli_args import decode_config_from_args
    from infer.engine import Engine

    cfg = decode_config_from_args(args)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    if args.cuda_graphs and cfg.mode == "d2f":
        raise UserError("--cuda-graphs keeps the batch's shapes fixed, so requests cannot join it; drop it to serve "
                        "with continuous batching")
    model, tok = load(args.model, cfg.mode, adapter=args.adapter, device=args.device, dtype=args.dtype,
                      cuda_graphs=args.cuda_graphs, compile=args.compile, tokenizer=args.tokenizer)
    if tok is None:
        raise UserError(f"no tokenizer found for model {args.model!r}; pass --tokenizer")
    engine = Engine(model, tok, cfg, max_batch=args.max_batch, max_queue=args.max_queue,
                    max_tokens_in_flight=args.max_tokens_in_flight, sdpa_kernels=DECODE_SDPA_KERNELS,
                    windows=args.windows).start()
    name = args.served_model_name or args.model or f"d2f-testbed-{cfg.mode}"
    return create_app(Server(engine, name, chat_template=not args.no_chat_template))


def parse_args(argv=None) -> argparse.Namespace:
    from infer.cli_args import add_compile_arg, add_decode_args
    p = argparse.ArgumentParser(prog="python -m infer.serve", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="preset, hub id or checkpoint dir (default: the testbed model for "
                                                 "the mode)")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir or hub id (default: the model's own)")
    p.add_argument("--adapter", default=None, help="PEFT LoRA adapter dir, merged into the model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--cuda-graphs", action="store_true", help="static shapes (not with mode d2f: requests join its "
                                                              "batch)")
    add_compile_arg(p)
    p.add_argument("--no-chat-template", action="store_true", help="chat messages joined as plain text")
    p.add_argument("--windows", choices=("rows", "union"), default="rows",
                   help="D2F: each request forwards its own window (rows), or the batch one window spanning all "
                        "(union: slower when requests are at different stages; the ablation)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's; a tiny "
                                                                      "model is often fastest with 1)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: --model)")
    p.add_argument("--max-batch", type=positive_int, default=16, help="requests decoded together per lane")
    p.add_argument("--max-queue", type=positive_int, default=256, help="queued + running requests; more get 429")
    p.add_argument("--max-tokens-in-flight", type=positive_int, default=None,
                   help="prompt + budget tokens of a lane's running requests (default: no limit but --max-batch)")
    add_decode_args(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    import uvicorn
    args = parse_args(argv)
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port} is not a TCP port (1-65535)")
    app = build(args)
    if args.compile:
        from infer.graphs import COMPILE_NOTE
        print(COMPILE_NOTE + ": the first requests wait for it", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
