"""The chat page in a real browser: Playwright drives Debian's chromium (``/usr/bin/chromium``,
which `.ci/run` installs) against a live server whose engine answers with known text, so each
test can say exactly what the page must show and what the page must have sent."""

from __future__ import annotations

import threading
import time
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from live_server import serve

from gptlab.errors import UserError
from gptlab.inference.engine import ChatPrompt, Completion, SamplingParams
from gptlab.serve.app import create_app

CHROMIUM = Path("/usr/bin/chromium")
try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright
except ImportError:
    pytest.skip("playwright is not installed: pip install -e '.[test]'", allow_module_level=True)
if not CHROMIUM.exists():
    pytest.skip(f"no browser at {CHROMIUM}: apt-get install chromium (.ci/run does this)", allow_module_level=True)

MODEL = "scripted"
HTML_REPLY = ('<script>document.title = "pwned"</script><img src="x" onerror="document.title = \'pwned\'">'
              "<b>bold</b> & done")
FAILED_PART, FAILURE = "Half an ans", "the engine failed half way"
PIECE_DELAY = 0.01  # seconds between streamed pieces, so the page sees many partial answers


class ByteTokenizer:
    """One id per UTF-8 byte, so a prompt's ids carry its text to ``ScriptedEngine.stream``."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode())


class ScriptedEngine:
    """Answers the last user message with known text, one character per piece, and records
    every conversation and every set of sampling settings it is given.

    "html" is answered with markup; "forever" with "tick " until ``max_new_tokens`` or until
    the server stops it (``stopped`` is set when a generation ends early); "fail" with
    ``FAILED_PART`` and then a ``UserError`` (``FAILURE``); anything else with
    ``reply(question, turn)``, where ``turn`` counts the user messages the page sent."""

    tokenizer = ByteTokenizer()
    block_size = 4096

    def __init__(self):
        self.conversations: list[list[dict[str, str]]] = []
        self.params: list[SamplingParams] = []
        self.stopped = threading.Event()

    @staticmethod
    def reply(question: str, turn: int) -> str:
        return f"Reply {turn} to {question}."

    def chat_prompt(self, messages: list[dict[str, str]], max_new_tokens: int) -> ChatPrompt:
        self.conversations.append(messages)
        turn = sum(m["role"] == "user" for m in messages)
        return ChatPrompt(self.tokenizer.encode(f"{turn}|{messages[-1]['content']}"), dropped_turns=0)

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Generator[str, None, Completion]:
        self.params.append(params)
        turn, question = bytes(prompt_ids).decode().split("|", 1)
        if question == "html":
            text = HTML_REPLY
        elif question == "fail":
            text = FAILED_PART
        elif question == "forever":
            text = "tick " * params.max_new_tokens
        else:
            text = self.reply(question, int(turn))
        shown = text[:params.max_new_tokens]
        finished = False
        try:
            for char in shown:
                time.sleep(PIECE_DELAY)
                yield char
            if question == "fail":
                raise UserError(FAILURE)
            finished = True
        finally:
            if not finished:
                self.stopped.set()
        return Completion(shown, self.tokenizer.encode(shown), "length" if shown != text else "stop")


@pytest.fixture(scope="module")
def engine() -> ScriptedEngine:
    return ScriptedEngine()


@pytest.fixture(scope="module")
def url(engine) -> Iterator[str]:
    yield from serve(create_app(engine, MODEL))


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    expect.set_options(timeout=10_000)  # waits for the page; generous, as the CPU may be shared
    with sync_playwright() as p:
        # As root in a container chromium needs --no-sandbox; nothing may reach the network.
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                    args=["--no-sandbox", "--disable-background-networking",
                                          "--disable-component-update", "--no-first-run"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, url, engine) -> Iterator[Page]:
    """A fresh page with no CSP bypass; it fails the test on any script error or CSP violation."""
    engine.conversations.clear()
    engine.params.clear()
    engine.stopped.clear()
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(10_000)
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"script error: {e}"))
    page.on("console", lambda m: problems.append(m.text) if "Content Security Policy" in m.text else None)
    page.goto(url)
    expect(page.locator("#model")).to_have_text(MODEL)  # the script ran and reached /v1/models
    yield page
    context.close()
    assert problems == []


def ask(page: Page, text: str) -> None:
    """Type ``text``, press Enter, and wait until the answer has finished."""
    page.fill("#input", text)
    page.press("#input", "Enter")
    wait_idle(page)


def wait_idle(page: Page) -> None:
    expect(page.locator("#send")).to_be_enabled()
    expect(page.locator("#stop")).to_be_disabled()


def turns(page: Page) -> list[tuple[str, str]]:
    """(role, exact text) of each turn shown, in order."""
    return [(div.get_attribute("class").split()[1], div.text_content())
            for div in page.locator("#log .turn").all()]


def assistant_text(page: Page) -> str:
    return page.locator("#log .assistant").last.text_content()


def test_two_turns_stream_in_order_and_the_page_renders(page, engine, tmp_path):
    # Note every partial answer the page shows, to see that it streams rather than waits.
    page.evaluate("""() => {
        window.partials = new Set();
        new MutationObserver(() => {
            for (const d of document.querySelectorAll('#log .assistant')) window.partials.add(d.textContent);
        }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
    }""")
    reply1, reply2 = engine.reply("hello there", 1), engine.reply("and again?", 2)
    ask(page, "hello there")
    assert turns(page) == [("user", "hello there"), ("assistant", reply1)]
    ask(page, "and again?")
    assert turns(page) == [("user", "hello there"), ("assistant", reply1),
                           ("user", "and again?"), ("assistant", reply2)]
    assert engine.conversations[-1] == [{"role": "user", "content": "hello there"},
                                        {"role": "assistant", "content": reply1},
                                        {"role": "user", "content": "and again?"}]
    partials = set(page.evaluate("[...window.partials]"))
    assert len({p for p in partials if reply2.startswith(p) and 0 < len(p) < len(reply2)}) >= 3
    assert page.input_value("#input") == ""

    shot = tmp_path / "chat.png"
    page.screenshot(path=str(shot), full_page=True)
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 2000


def test_settings_are_sent_and_obeyed(page, engine):
    page.fill("#temperature", "0.3")
    page.fill("#top_p", "0.9")
    page.fill("#max_tokens", "7")
    ask(page, "short please")
    params = engine.params[-1]
    assert (params.temperature, params.top_p, params.max_new_tokens) == (0.3, 0.9, 7)
    assert assistant_text(page) == engine.reply("short please", 1)[:7]

    page.fill("#top_p", "1")  # 1 keeps every token; an empty box leaves the server's default
    page.fill("#max_tokens", "")
    ask(page, "defaults")
    params = engine.params[-1]
    assert params.top_p is None and params.max_new_tokens == 256 and params.temperature == 0.3


def test_stop_ends_the_answer_and_keeps_what_came(page, engine):
    page.fill("#input", "forever")
    page.press("#input", "Enter")
    expect(page.locator("#stop")).to_be_enabled()
    expect(page.locator("#send")).to_be_disabled()
    expect(page.locator("#log .assistant")).to_contain_text("tick tick tick")
    page.click("#stop")
    wait_idle(page)
    assert engine.stopped.wait(5)  # the server stopped generating, not just the page reading
    kept = assistant_text(page)
    assert kept.startswith("tick tick tick") and len(kept) < 256 * len("tick ")
    assert "stopped" in page.locator("#log .assistant").last.get_attribute("class")
    time.sleep(20 * PIECE_DELAY)
    assert assistant_text(page) == kept  # nothing more arrives

    ask(page, "after stop")  # the partial answer is part of the conversation
    assert engine.conversations[-1][1] == {"role": "assistant", "content": kept}
    assert assistant_text(page) == engine.reply("after stop", 2)


def test_new_chat_forgets_the_conversation_even_mid_answer(page, engine):
    ask(page, "first")
    page.click("#new_chat")
    assert turns(page) == []
    ask(page, "second")
    assert engine.conversations[-1] == [{"role": "user", "content": "second"}]
    assert turns(page) == [("user", "second"), ("assistant", engine.reply("second", 1))]

    page.fill("#input", "forever")
    page.press("#input", "Enter")
    expect(page.locator("#log .assistant").last).to_contain_text("tick")
    page.click("#new_chat")
    wait_idle(page)
    assert engine.stopped.wait(5) and turns(page) == []
    ask(page, "third")
    assert engine.conversations[-1] == [{"role": "user", "content": "third"}]


def test_markup_in_a_reply_shows_as_text(page, engine):
    ask(page, "html")
    assert assistant_text(page) == HTML_REPLY
    assert page.locator("#log script, #log img, #log b").count() == 0
    assert page.title() == "gptlab chat"


def test_a_rejected_request_shows_the_servers_reason(page, engine):
    page.fill("#temperature", "5")
    ask(page, "too hot")
    assert turns(page) == [("error", "error: temperature=5 must be a number in [0, 2]")]
    assert page.input_value("#input") == "too hot"  # the question comes back to send again
    page.fill("#temperature", "1")
    page.click("#send")
    wait_idle(page)
    assert turns(page) == [("error", "error: temperature=5 must be a number in [0, 2]"),
                           ("user", "too hot"), ("assistant", engine.reply("too hot", 1))]


def test_the_api_key_box_is_sent(browser, engine):
    for url in serve(create_app(engine, MODEL, api_key="s3cret")):
        page = browser.new_page()
        page.set_default_timeout(10_000)
        page.goto(url)
        ask(page, "locked")
        assert turns(page) == [("error", "error: missing or wrong API key: send 'Authorization: Bearer KEY'")]
        page.fill("#api_key", "s3cret")
        page.click("#send")  # the question came back to the input box
        wait_idle(page)
        expect(page.locator("#model")).to_have_text(MODEL)
        assert turns(page)[1:] == [("user", "locked"), ("assistant", engine.reply("locked", 1))]
        page.close()


def test_an_error_mid_answer_is_shown_and_the_part_kept(page, engine):
    ask(page, "fail")
    assert turns(page) == [("user", "fail"), ("assistant", FAILED_PART), ("error", f"error: {FAILURE}")]
    ask(page, "and now?")
    assert engine.conversations[-1][1] == {"role": "assistant", "content": FAILED_PART}
