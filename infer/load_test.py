"""Load test of `python -m infer.serve` with the `openai` client: throughput and latency by concurrency.

    python -m infer.load_test                       # starts the testbed server itself, 64 held-out problems
    python -m infer.load_test --url http://127.0.0.1:8000 --concurrency 1,8,32

For each concurrency level the same prompts (held-out testbed problems, as `infer.eval` builds them) are
sent as streaming chat-less completions at temperature 0 by that many client threads. Every answer must
equal the one it got at concurrency 1, where each request decodes alone (itself equal to
`infer.api.generate`, tests/infer/test_serve.py): a lost, failed or mixed-up response is counted and
makes the command exit 1. Per level: requests/s, completion tokens/s, p50/p95 latency and time to
the first text chunk. The server runs in its own process (started here unless --url), so the client
threads do not compete with the scheduler for the GIL; on a small CPU they still share its cores.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from d2f.errors import UserError, check_output_dir, positive_int, run_main


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    i = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[i]


def one_request(client, prompt: str, max_tokens: int, timeout: float) -> dict:
    """A streaming completion; returns its text, tokens, NFE, latency and time to first chunk."""
    t0 = time.perf_counter()
    first, pieces, usage, finish = None, [], None, None
    try:
        stream = client.completions.create(model=client.served_model, prompt=prompt, max_tokens=max_tokens,
                                           temperature=0, stream=True, stream_options={"include_usage": True},
                                           timeout=timeout)
        for ch in stream:
            if ch.choices:
                if ch.choices[0].text:
                    if first is None:
                        first = time.perf_counter() - t0
                    pieces.append(ch.choices[0].text)
                finish = ch.choices[0].finish_reason or finish
            if ch.usage is not None:
                usage = ch.usage
    except Exception as e:  # counted as a failure, never raised: the other requests go on
        return {"error": f"{type(e).__name__}: {e}", "latency": time.perf_counter() - t0}
    latency = time.perf_counter() - t0
    if usage is None:
        return {"error": "no usage chunk (the stream ended early)", "latency": latency}
    return {"text": "".join(pieces), "tokens": usage.completion_tokens, "nfe": (usage.model_extra or {}).get("nfe"),
            "latency": latency, "first_chunk": first if first is not None else latency, "finish": finish}


def run_level(client, prompts: list[str], concurrency: int, max_tokens: int, timeout: float) -> tuple[list, float]:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        out = list(pool.map(lambda p: one_request(client, p, max_tokens, timeout), prompts))
    return out, time.perf_counter() - t0


def summarize(level: int, results: list[dict], wall: float, reference: list[dict] | None) -> dict:
    ok = [r for r in results if "error" not in r]
    mismatched = 0
    if reference is not None:
        mismatched = sum(1 for r, ref in zip(results, reference)
                         if "error" not in r and "error" not in ref and r["text"] != ref["text"])
    tokens = sum(r["tokens"] for r in ok)
    return {"concurrency": level, "requests": len(results), "failed": len(results) - len(ok), "mismatched": mismatched,
            "wall_s": wall, "requests_per_s": len(ok) / wall, "tokens_per_s": tokens / wall,
            "mean_tokens": tokens / max(len(ok), 1), "mean_nfe": sum(r["nfe"] or 0 for r in ok) / max(len(ok), 1),
            "p50_latency_s": percentile([r["latency"] for r in ok], 50),
            "p95_latency_s": percentile([r["latency"] for r in ok], 95),
            "p50_first_chunk_s": percentile([r["first_chunk"] for r in ok], 50),
            "p95_first_chunk_s": percentile([r["first_chunk"] for r in ok], 95),
            "errors": sorted({r["error"] for r in results if "error" in r})[:3]}


def table(rows: list[dict]) -> str:
    base = rows[0]["tokens_per_s"] if rows and rows[0]["concurrency"] == 1 else None
    lines = ["| concurrency | requests | failed | mismatched | tokens/s | vs c=1 | requests/s | tokens/request | "
             "NFE/request | p50 latency (s) | p95 latency (s) | p50 first chunk (s) | p95 first chunk (s) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        lines.append(f"| {r['concurrency']} | {r['requests']} | {r['failed']} | {r['mismatched']} | "
                     f"{r['tokens_per_s']:.1f} | {ratio} | {r['requests_per_s']:.2f} | {r['mean_tokens']:.1f} | "
                     f"{r['mean_nfe']:.1f} | {r['p50_latency_s']:.2f} | {r['p95_latency_s']:.2f} | "
                     f"{r['p50_first_chunk_s']:.2f} | {r['p95_first_chunk_s']:.2f} |")
    return "\n".join(lines)


# The testbed's D2F setting (configs/compare_testbed.yaml): the block size the student was distilled with.
# torch's default threads: one alone decodes as fast, but a batch of 16 windows runs ~1.8x faster on two.
TESTBED_SERVER_ARGS = ["--max-new-tokens", "128", "--block-size", "16", "--tau-add", "0.7", "--tau-act", "0.95",
                       "--tau-conf", "0.99"]


def serve_args(server_args: list[str]) -> list[str]:
    """The testbed D2F setting, then the user's options: serve keeps an option's last value, so each one given
    replaces that setting and the rest stay (`-- --windows union` alone must not drop the thresholds)."""
    return TESTBED_SERVER_ARGS + list(server_args or [])


def start_server(args, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "infer.serve", "--port", str(port), "--max-batch", str(args.max_batch),
           "--max-queue", str(max(256, max(args.levels) * 2))] + serve_args(args.server_args)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_ready(url: str, proc: subprocess.Popen | None, timeout: float = 300) -> dict:
    import httpx
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise UserError(f"the server exited with status {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            r = httpx.get(url + "/health", timeout=2)
            if r.status_code == 200:
                return r.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise UserError(f"no server answered at {url}/health within {timeout:.0f} s")


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m infer.load_test", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="a running server (default: start `python -m infer.serve` here)")
    p.add_argument("--concurrency", default="1,4,16,64", help="comma-separated levels (the first should be 1: it "
                                                              "is the reference every answer must equal)")
    p.add_argument("--requests", type=positive_int, default=64, help="prompts sent at each level")
    p.add_argument("--max-tokens", type=positive_int, default=128)
    p.add_argument("--tokenizer", default=None, help="formats the prompts (default: the testbed's)")
    p.add_argument("--max-batch", type=positive_int, default=64, help="the started server's --max-batch")
    p.add_argument("--shots", type=int, default=0, help="few-shot examples in each prompt (infer.eval's format)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--output-dir", default="outputs/load_test")
    p.add_argument("server_args", nargs="*", help="after --: options for `python -m infer.serve` (model, decode "
                                                  "settings), added to the testbed D2F setting "
                                                  "(configs/compare_testbed.yaml); each one given replaces its value")
    args = p.parse_args(argv)
    try:
        args.levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--concurrency {args.concurrency!r}: expected comma-separated integers, e.g. 1,4,16") from None
    if not args.levels or min(args.levels) < 1:
        raise UserError(f"--concurrency {args.concurrency!r}: levels must be integers >= 1")
    if not args.timeout > 0:
        raise UserError(f"--timeout must be positive, got {args.timeout}")
    return args


def main(argv=None) -> int:
    import openai

    from infer.eval import load_problems, make_prompts
    from d2f.models.refs import load_tokenizer
    from d2f import testbed

    args = parse_args(argv)
    check_output_dir(args.output_dir, "--output-dir")
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    proc = None
    url = args.url
    if url is None:
        url = f"http://127.0.0.1:{free_port()}"
        proc = start_server(args, int(url.rsplit(":", 1)[1]))
    try:
        health = wait_ready(url, proc)
        tok = load_tokenizer(args.tokenizer or str(testbed.tokenizer_path()))
        problems = load_problems("testbed", "test", args.requests)
        prompts = make_prompts(tok, problems, shots=args.shots)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        client.served_model = health["model"]
        rows, reference = [], None
        for level in args.levels:
            results, wall = run_level(client, prompts, level, args.max_tokens, args.timeout)
            if reference is None and level == 1:
                reference = results
            rows.append(summarize(level, results, wall, reference))
            r = rows[-1]
            print(f"concurrency {level}: {r['tokens_per_s']:.1f} tokens/s, p50 latency {r['p50_latency_s']:.2f} s, "
                  f"failed {r['failed']}, mismatched {r['mismatched']}", flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    md = table(rows)
    meta = {"url": url if args.url else "started here", "server": health, "requests": args.requests,
            "max_tokens": args.max_tokens, "shots": args.shots, "date": time.strftime("%Y-%m-%d"),
            "server_args": serve_args(args.server_args)}
    (out_dir / "load_test.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (out_dir / "load_test.md").write_text(md + "\n")
    print(md)
    bad = sum(r["failed"] + r["mismatched"] for r in rows)
    if bad:
        print(f"{bad} failed or mismatched responses", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
