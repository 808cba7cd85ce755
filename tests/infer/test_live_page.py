"""The live page (GET /, infer/static/live.html) in a real headless Chromium against a real uvicorn socket:
it decodes a prompt, shows the same answer `infer.api.generate` gives, draws several blocks decoding at
once (D2F's pipeline), counts the forwards the server counted, and shows a server error.

Skips where Chromium (/usr/bin/chromium, or D2F_CHROMIUM) or the playwright package is missing; CI
installs both (.ci/run, the dev extra)."""

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")  # helpers.Running's client

from browser import chromium_page, missing  # noqa: E402

if missing():
    pytest.skip(missing(), allow_module_level=True)

from helpers import Running, slow_forwards, wait_freed  # noqa: E402
from infer.api import DecodeConfig, format_prompt, generate  # noqa: E402
from infer.engine import Engine  # noqa: E402

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"
CFG = DecodeConfig(mode="d2f", max_new_tokens=64, block_size=16, tau_add=0.7, tau_act=0.95, tau_conf=0.9)
SETTLED = "['done', 'error', 'stopped'].includes(document.getElementById('status').dataset.state)"


@pytest.fixture(scope="module")
def server(student):
    model, tok = student
    with Running(Engine(model, tok, CFG).start()) as s:
        yield s


@pytest.fixture(scope="module")
def page(server):
    with chromium_page() as p:
        p.js_errors = []  # uncaught exceptions in the page's script
        p.on("pageerror", lambda e: p.js_errors.append(str(e)))
        p.goto(server.url + "/")
        p.wait_for_function("document.getElementById('mode').textContent === 'd2f'", timeout=30_000)
        yield p
        assert not p.js_errors


def decode(page, max_tokens, **decode):
    """Fill the form (empty fields: the server's settings), press Decode, wait until the request settles."""
    page.fill("#prompt", QUESTION)
    page.fill("#max-tokens", str(max_tokens))
    for field in ("tau_conf", "tau_add", "tau_act", "block_size"):
        page.fill("#" + field.replace("_", "-"), str(decode.get(field, "")))
    page.click("#decode")
    page.wait_for_function(SETTLED, timeout=120_000)
    return page.get_attribute("#status", "data-state"), page.text_content("#status")


def test_page_shows_the_answer_generate_gives(server, student, page):
    """tau_add 0.3 (a setting sent from the form) adds blocks early: several decode at once."""
    model, tok = student
    cfg = DecodeConfig(**{**CFG.__dict__, "tau_add": 0.3})
    [ref] = generate(model, tok, [format_prompt(tok, QUESTION)], cfg)
    state, status = decode(page, 64, tau_add=0.3)
    assert state == "done", status
    assert page.text_content("#model") == "testbed" and page.text_content("#mode") == "d2f"
    assert page.text_content("#answer") == ref.text
    final = page.evaluate("window.d2fFinal")
    assert final["nfe"] == ref.nfe and final["completion_tokens"] == ref.num_tokens
    assert page.text_content("#nfe") == str(ref.nfe)
    assert page.evaluate("window.d2fLastStep") == ref.nfe  # one view per forward, all drawn
    # the pipeline: more than one block semi- or fully activated at the same forward
    assert page.evaluate("window.d2fMaxInFlight") > 1
    assert int(page.get_attribute("#blocks", "data-max-in-flight")) > 1
    assert page.locator("#blocks .block").count() == 64 // 16
    assert not page.is_visible("#error")


def test_page_shows_server_errors(page):
    state, status = decode(page, 16, tau_conf=2)
    assert state == "error" and "tau_conf" in status
    assert page.is_visible("#error") and "tau_conf" in page.text_content("#error")
    # and the page recovers: the next request decodes
    state, status = decode(page, 16)
    assert state == "done", status
    assert not page.is_visible("#error")


def test_stop_hangs_up_and_frees_the_row(server, student, page):
    """One token per forward, a long budget and slowed forwards: the decode is still running when Stop is
    pressed, and the row is freed before the forwards the whole answer takes have run."""
    model, tok = student
    one_per_forward = dict(tau_conf=1.0, tau_add=1.0, tau_act=1.0, max_new_tokens=448)
    [full] = generate(model, tok, [format_prompt(tok, QUESTION)], DecodeConfig(**{**CFG.__dict__, **one_per_forward}))
    page.fill("#prompt", QUESTION)
    page.fill("#max-tokens", "448")  # + the prompt: within the testbed's 512 positions
    page.fill("#block-size", "")
    for field in ("#tau-conf", "#tau-add", "#tau-act"):
        page.fill(field, "1")
    with slow_forwards(server.engine.model, 0.2) as forwards:
        page.click("#decode")
        page.wait_for_function(f"window.d2fLastStep >= 3 || {SETTLED}", timeout=60_000)
        assert page.get_attribute("#status", "data-state") == "running", page.text_content("#status")
        page.click("#stop")
        page.wait_for_function(SETTLED, timeout=30_000)
        assert page.get_attribute("#status", "data-state") == "stopped"
        wait_freed(server.engine, 10)
        assert server.engine.requests == 0 and not server.engine.lanes
        assert forwards[0] < full.nfe  # hung up mid-decode, not freed by the answer's end
    assert page.is_enabled("#decode") and not page.is_enabled("#stop")
