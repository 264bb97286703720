"""The chat page in a real browser (Debian's Chromium driven by Playwright) against a real
server on the tiny model: what a person does, found the way a screen reader finds it."""

from __future__ import annotations

import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import Hold, make_config, start_server, submissions
from playwright.sync_api import Browser, Page, expect, sync_playwright

from edge_llm.server import Server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
WAIT = 60_000  # ms: a hang guard for the slowest machine, not a speed limit
CODE_QUESTION = "Write a Python function that adds two numbers."  # the tiny model fences it


@pytest.fixture(scope="module")
def web(tiny_model: Path) -> Iterator[Server]:
    srv = start_server(tiny_model, default_max_tokens=48)
    yield srv
    srv.stop(drain=0)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is missing: scripts/bootstrap installs it (apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


class Watched:
    """A page and what it did: console errors, uncaught exceptions, every URL it asked for."""

    def __init__(
        self, browser: Browser, base: str, wait_for_socket: bool = True, **context: Any
    ) -> None:
        self.context = browser.new_context(**context)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.urls: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.urls.append(r.url))
        self.page.on("websocket", lambda ws: self.urls.append(ws.url))
        self.base = base
        self.page.goto(base)
        if wait_for_socket:
            expect(self.page.locator("#conn-state")).to_have_attribute("data-state", "open")

    def check_clean(self) -> None:
        assert not self.errors
        origin = re.sub(r"^http", "", self.base.rstrip("/"))
        assert all(re.sub(r"^(http|ws)", "", u).startswith(origin) for u in self.urls), self.urls


@pytest.fixture
def tab(browser: Browser, web: Server) -> Iterator[Watched]:
    w = Watched(
        browser, f"http://127.0.0.1:{web.http_port}/", viewport={"width": 1280, "height": 800}
    )
    yield w
    w.check_clean()
    w.context.close()


def ask(page: Page, text: str) -> None:
    box = page.get_by_role("textbox", name="Message", exact=True)
    box.fill(text)
    box.press("Enter")


def answered(page: Page) -> None:
    """Until the last answer shows its speed: it is complete."""
    expect(page.locator(".msg-assistant .msg-meta").last).to_contain_text("tokens/s", timeout=WAIT)


def sessions(web: Server) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{web.http_port}/api/sessions"
    return list(httpx.get(url, params={"page_size": 1000}).json()["sessions"])


def test_a_person_chats_and_the_answer_types_itself_out(
    tab: Watched, web: Server, tmp_path: Path
) -> None:
    page = tab.page
    for role, name in [("textbox", "Message"), ("button", "Send"), ("button", "Stop")]:
        expect(page.get_by_role(role, name=name, exact=True)).to_be_visible()
    expect(page.get_by_role("button", name="New chat", exact=True)).to_be_visible()
    expect(page.get_by_role("navigation", name="Conversations")).to_be_visible()
    # Every text the answer shows while it streams: several partial renders, not one block.
    # Every text the answer shows while it streams (several partial renders, not one block),
    # and when each repaint came (at most one per 50 ms, not one per token).
    page.evaluate(
        """() => { window.seen = new Set(); window.paints = [];
        new MutationObserver(() => { const a = document.getElementById('live-answer');
          if (a && !window.seen.has(a.textContent.length)) {
            window.seen.add(a.textContent.length); window.paints.push(performance.now()); } })
        .observe(document.getElementById('messages'), {childList: true, subtree: true,
                                                        characterData: true}); }"""
    )
    page.get_by_role("button", name="Settings", exact=True).click()
    page.get_by_role("spinbutton", name="Temperature").fill("0")
    page.get_by_role("button", name="Save", exact=True).click()
    ask(page, CODE_QUESTION)
    answered(page)
    assert len(page.evaluate("[...window.seen].filter(n => n > 0)")) >= 3
    paints = page.evaluate("window.paints")
    assert len(paints) <= (paints[-1] - paints[0]) / 50 + 2  # throttled
    code = page.locator(".codeblock code.hljs")
    expect(code.first).to_be_visible()
    assert page.locator(".codeblock code.hljs .hljs-keyword").count() > 0  # highlighted
    expect(page.get_by_role("button", name="Copy", exact=True).first).to_be_visible()
    meta = page.locator(".msg-assistant .msg-meta").last.inner_text()
    assert "tokens/s" in meta and "first token" in meta
    (kept,) = [s for s in sessions(web) if s["title"] == CODE_QUESTION]
    assert kept["message_count"] == 2 and kept["defaults"]["temperature"] == 0
    page.screenshot(path=str(tmp_path / "chat-page.png"))  # to look at when it fails


def test_stop_ends_the_generation_on_the_server(tab: Watched, web: Server) -> None:
    scheduler = web.core.loaded.scheduler  # type: ignore[union-attr]
    page = tab.page
    page.get_by_role("button", name="New chat", exact=True).click()
    hold = Hold(scheduler, lambda job: job.stats.completion_tokens >= 2)
    try:
        ask(page, "Count from one to one hundred.")
        assert hold.reached.wait(60)
        job = hold.job
        assert job is not None
        page.get_by_role("button", name="Stop", exact=True).click()
        assert job.cancelled.wait(60)  # the server's worker still waits after token 2
    finally:
        hold.release()
    expect(page.locator(".msg-assistant .msg-meta").last).to_contain_text("not saved", timeout=WAIT)
    assert job.stats.completion_tokens == 2
    expect(page.get_by_role("button", name="Send", exact=True)).to_be_visible()


def test_conversations_survive_a_reload_and_new_and_delete_work(tab: Watched, web: Server) -> None:
    page = tab.page
    page.get_by_role("button", name="New chat", exact=True).click()
    ask(page, "Name a colour.")
    answered(page)
    nav = page.get_by_role("navigation", name="Conversations")
    expect(nav.get_by_role("link", name="Name a colour.")).to_be_visible()
    page.reload()
    expect(page.locator(".msg-user").first).to_contain_text("Name a colour.", timeout=WAIT)
    page.get_by_role("button", name="New chat", exact=True).click()
    ask(page, "Name a fruit.")
    answered(page)
    row = page.locator(".conv", has_text="Name a colour.")
    row.get_by_role("button", name="Delete", exact=True).click()
    expect(nav.get_by_role("link", name="Name a colour.")).to_have_count(0)
    titles = [s["title"] for s in sessions(web)]
    assert "Name a fruit." in titles and "Name a colour." not in titles
    # Another device (a fresh browser context) sees the same conversations.
    other = Watched(page.context.browser, tab.base)  # type: ignore[arg-type]
    expect(other.page.get_by_role("link", name="Name a fruit.")).to_be_visible()
    other.check_clean()
    other.context.close()


def test_regenerate_replaces_the_last_answer(tab: Watched, web: Server) -> None:
    page = tab.page
    page.get_by_role("button", name="New chat", exact=True).click()
    ask(page, "Say a word.")
    answered(page)
    page.get_by_role("button", name="Regenerate", exact=True).click()
    answered(page)
    (session,) = [s for s in sessions(web) if s["title"] == "Say a word."]
    assert session["message_count"] == 2  # replaced, not appended
    assert page.locator(".msg").count() == 2


def test_a_phone_sized_screen_in_the_dark(browser: Browser, web: Server) -> None:
    w = Watched(
        browser,
        f"http://127.0.0.1:{web.http_port}/",
        viewport={"width": 360, "height": 740},
        color_scheme="dark",
        has_touch=True,
        is_mobile=True,
    )
    page = w.page
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    for role, name in [("textbox", "Message"), ("button", "Send"), ("button", "New chat")]:
        expect(page.get_by_role(role, name=name, exact=True)).to_be_visible()
    nav = page.get_by_role("navigation", name="Conversations")
    expect(nav).to_be_hidden()
    page.get_by_role("button", name="Conversations").tap()
    expect(nav).to_be_visible()
    page.keyboard.press("Escape")
    ask(page, "Hi")
    answered(page)
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    w.check_clean()
    w.context.close()


def test_loading_busy_and_gone_are_said_plainly(browser: Browser, tiny_model: Path) -> None:
    """503 while the model loads, 429 when the queue is full, and a server that went away:
    each is a plain message with a retry, and the page recovers on its own."""
    srv = Server(make_config(tiny_model, queue_depth=1))
    srv.start()  # listening, the model not loaded yet
    try:
        w = Watched(browser, f"http://127.0.0.1:{srv.http_port}/", wait_for_socket=False)
        page, banner = w.page, w.page.locator("#banner")
        expect(banner).to_contain_text("loading", timeout=WAIT)
        srv.load()
        expect(banner).to_be_hidden(timeout=WAIT)  # it retried by itself (Retry-After: 1)

        scheduler = srv.core.loaded.scheduler  # type: ignore[union-attr]
        hold = Hold(scheduler, lambda job: True)
        url = f"http://127.0.0.1:{srv.http_port}/v1/completions"
        body = {"prompt": "x", "max_tokens": 2}
        fillers = [threading.Thread(target=httpx.post, args=(url,), kwargs={"json": body})]
        fillers.append(threading.Thread(target=httpx.post, args=(url,), kwargs={"json": body}))
        try:
            fillers[0].start()
            assert hold.reached.wait(60)  # one running
            waiting = submissions(scheduler, 1)
            fillers[1].start()
            assert waiting.wait(60)  # one waiting: the queue is full
            ask(page, "Hi")
            expect(banner).to_contain_text("busy", timeout=WAIT)
            expect(page.get_by_role("button", name="Retry", exact=True)).to_be_visible()
        finally:
            hold.release()
        for t in fillers:
            t.join(60)
        answered(page)  # the page retried after Retry-After, and the answer came
        expect(banner).to_be_hidden()

        srv.stop(drain=0)
        expect(banner).to_contain_text(re.compile("restarting|reach"), timeout=WAIT)
        expect(page.get_by_role("button", name="Retry", exact=True)).to_be_visible()
        # The browser itself logs each refused request (503, the socket to a stopped server).
        expected = ("Failed to load resource", "WebSocket", "ERR_CONNECTION")
        w.errors = [e for e in w.errors if not any(x in e for x in expected)]
        w.check_clean()
        w.context.close()
    finally:
        if not srv._stopping:
            srv.stop(drain=0)


def test_a_guarded_appliance_takes_its_token_from_the_url_or_asks_once(
    browser: Browser, tiny_model: Path, tmp_path: Path
) -> None:
    """With auth_tokens: the URL the server prints (…/#token=T) opens the page ready to chat;
    without it the page asks for the token once, then its calls and WebSocket carry it."""
    secret = "kiosk-token-0123456789abcdef"
    tokens = tmp_path / "tokens"
    tokens.write_text(f"kiosk {secret}\n")
    tokens.chmod(0o600)
    srv = start_server(tiny_model, default_max_tokens=16, auth_tokens=str(tokens))
    try:
        base = f"http://127.0.0.1:{srv.http_port}/"
        tab = Watched(browser, f"{base}#token={secret}")
        assert "token" not in tab.page.url  # out of the address bar (and its history)
        ask(tab.page, "Hi")
        answered(tab.page)
        tab.base = base  # what check_clean compares every URL with
        tab.check_clean()
        tab.context.close()

        context = browser.new_context()
        page = context.new_page()
        asked: list[str] = []
        page.on("dialog", lambda d: (asked.append(d.message), d.accept(secret)))
        page.goto(base)
        expect(page.locator("#conn-state")).to_have_attribute("data-state", "open", timeout=WAIT)
        ask(page, "Hello")
        answered(page)
        assert len(asked) == 1 and "needs its token" in asked[0], asked  # once, however
        # many calls the page had made
        context.close()
    finally:
        srv.stop(drain=0)
