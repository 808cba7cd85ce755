"""Screenshot the live page (GET / of `python -m infer.serve`) mid-decode: docs/live_view.png.

    .venv/bin/python scripts/screenshot_live_view.py [--out docs/live_view.png]

Serves the testbed D2F student in-process with `python -m infer.serve`'s default settings, opens the
page in headless Chromium (tests/infer/browser.py: the system Chromium, no downloads), decodes the
pre-filled question with max_tokens 128, block_size 16 and tau_add 0.3 (blocks are added early, so
several decode at once) and takes the picture at the first forward with >= 3 blocks in flight and a
finished or cached block before them. To catch that forward the engine's scheduler thread waits after
sending its view until the picture is taken: the timings on the page are those up to that forward.
"""
import argparse
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "infer")]  # helpers.Running and browser live with the tests

FORM = {"#max-tokens": "128", "#block-size": "16", "#tau-add": "0.3"}


def interesting(ev: dict) -> bool:
    blocks = ev.get("blocks") or []
    in_flight = sum(s in ("semi", "active") for s in blocks)
    return in_flight >= 3 and any(s in ("finished", "cached") for s in blocks) and None in ev["pieces"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "live_view.png"))
    p.add_argument("--width", type=int, default=1100)
    p.add_argument("--height", type=int, default=700)
    args = p.parse_args(argv)

    import torch

    from browser import chromium_page, missing
    from helpers import Running
    from infer.api import load
    from infer.cli_args import decode_config_from_args
    from infer.engine import Engine
    from infer.serve import parse_args
    if missing():
        raise SystemExit(f"cannot take the screenshot: {missing()}")
    torch.set_num_threads(1)  # the testbed model is tiny: one thread is fastest

    cfg = decode_config_from_args(parse_args([]))  # the server's defaults
    model, tok = load(None, cfg.mode)
    engine = Engine(model, tok, cfg)
    caught: dict = {}
    taken = threading.Event()
    send = engine.send

    def send_and_hold(req, ev):  # runs on the scheduler thread, after each forward
        send(req, ev)
        if ev["type"] == "view" and not caught and interesting(ev):
            caught.update(ev)
            taken.wait(timeout=60)  # the next forward waits for the screenshot

    engine.send = send_and_hold
    with Running(engine.start()) as server, chromium_page(args.width, args.height) as page:
        try:
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('mode').textContent !== '…'")
            for sel, value in FORM.items():
                page.fill(sel, value)
            page.click("#decode")
            t0 = time.monotonic()
            while not caught and time.monotonic() - t0 < 60:
                if page.get_attribute("#status", "data-state") in ("done", "error"):
                    break
                time.sleep(0.02)
            if not caught:
                raise SystemExit("no forward had 3 blocks in flight: " + (page.text_content("#status") or ""))
            page.wait_for_function(f"window.d2fLastStep === {caught['step']}")
            page.screenshot(path=args.out)
        finally:
            taken.set()
        page.wait_for_function("document.getElementById('status').dataset.state !== 'running'", timeout=60_000)
    size = Path(args.out).stat().st_size
    print(f"{args.out}: forward {caught['step']}, blocks {caught['blocks']}, {size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
