"""Drive the demo page in headless Chromium (Debian's /usr/bin/chromium) with Playwright.

Run by tests/test_demo_browser.py in its own process: Playwright's sync API
runs on greenlets of its own and must not meet gevent's monkey-patching.
Prints one JSON object with what the pages showed.

    python tests/browser_driver.py http://127.0.0.1:8000 /tmp/demo.png
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from typing import Any

from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-features=LocalNetworkAccessChecks",
]
TIMEOUT_MS = 10_000


def _handshake(what: str) -> None:
    """Ask the test to do ``what`` to the server and wait until it is done."""
    print(what, flush=True)
    if sys.stdin.readline().strip() != "done":
        raise SystemExit(f"the test did not {what} the server")


def main(url: str, screenshot: str) -> dict[str, Any]:
    out: dict[str, Any] = {"page_errors": [], "console_errors": []}
    with tempfile.TemporaryDirectory(prefix="gstream-chromium-") as profile, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": 1280, "height": 860}, device_scale_factor=1)
        context.set_default_timeout(TIMEOUT_MS)
        try:
            first = context.new_page()
            second = context.new_page()
            for page in (first, second):
                page.on("pageerror", lambda exc: out["page_errors"].append(str(exc)))
                page.on("console", lambda msg: out["console_errors"].append(msg.text)
                        if msg.type == "error" else None)

            # The feed: ticker events arrive over EventSource, with their ids.
            first.goto(url + "/")
            first.wait_for_selector("#feed-status[data-state=live]")
            first.wait_for_function("document.querySelectorAll('#feed li.event').length >= 2")
            out["feed_ids"] = first.eval_on_selector_all(
                "#feed li.event", "els => els.map(e => e.dataset.id)")
            out["feed_last_id"] = first.inner_text("#feed-last-id")

            # The chat: a message from the first page shows up on the second.
            second.goto(url + "/")
            for page in (first, second):
                page.wait_for_selector("#chat-send:not([disabled])")
            first.fill("#chat-name", "Alice")
            first.fill("#chat-input", "hello from page one")
            first.click("#chat-send")
            second.wait_for_selector(".msg.theirs:has-text('hello from page one')")
            out["second_sees"] = second.inner_text(".msg.theirs")
            first.wait_for_selector(".msg.mine:has-text('hello from page one')")
            second.fill("#chat-name", "Bob")
            second.fill("#chat-input", "hi Alice, the feed is ticking")
            second.press("#chat-input", "Enter")
            first.wait_for_selector(".msg.theirs:has-text('hi Alice')")
            out["first_sees"] = first.inner_text(".msg.theirs")

            # Presence: each page lists both members, under the names they chat with;
            # a third page joins the list and leaves it when it is closed.
            chips = "document.querySelectorAll('#chat-presence .who-here').length === "
            for page in (first, second):
                page.wait_for_function(chips + "2")
            first.wait_for_selector("#chat-presence .who-here:has-text('Bob')")
            second.wait_for_selector("#chat-presence .who-here.me:has-text('Bob')")
            second.wait_for_selector("#chat-presence .who-here:has-text('Alice')")
            out["presence_first"] = first.inner_text("#chat-presence")
            out["presence_count"] = first.inner_text("#chat-present-count")
            third = context.new_page()
            third.goto(url + "/")
            first.wait_for_function(chips + "3")
            out["presence_third"] = third.inner_text("#chat-presence")
            third.close()
            first.wait_for_function(chips + "2")
            out["presence_after_leave"] = first.inner_text("#chat-presence")

            # Publishing from the page goes through POST /publish to every feed.
            first.fill("#publish-text", "published from the page")
            first.click("#publish-form button")
            second.wait_for_selector("#feed li.event:has-text('published from the page')")
            out["published_seen"] = True

            # Live statistics over /stats/stream.
            first.wait_for_function(
                "document.getElementById('stat-ws').textContent === '2'"
                " && Number(document.getElementById('stat-sse').textContent) >= 2")
            out["stats"] = {k: first.inner_text(f"#stat-{k}")
                            for k in ("connections", "sse", "ws", "eps", "dropped", "published")}
            out["statuses"] = [first.get_attribute(f"#{k}-status", "data-state")
                               for k in ("feed", "chat", "stats")]
            time.sleep(1.5)  # a few more feed events and a sparkline for the picture
            first.screenshot(path=screenshot, full_page=True)

            # Restart: the page shows it is reconnecting, then resumes the feed.
            before = max(int(i) for i in first.eval_on_selector_all(
                "#feed li.event", "els => els.map(e => e.dataset.id)"))
            # Connection errors are expected from here on: keep the earlier ones.
            out["console_errors_before_restart"] = list(out["console_errors"])
            _handshake("stop")  # the test stops the server
            first.wait_for_selector("#feed-status[data-state=reconnecting]")
            first.wait_for_selector("#chat-status[data-state=reconnecting]")
            out["reconnecting_shown"] = True
            _handshake("start")  # the test starts a new server on the same port
            first.wait_for_function(
                "document.getElementById('feed-reconnects').textContent === '1'")
            first.wait_for_selector("#feed-status[data-state=live]")
            first.wait_for_function(
                f"[...document.querySelectorAll('#feed li.event')].some(e => Number(e.dataset.id) > {before})")
            first.wait_for_selector("#chat-send:not([disabled])")
            out["resumed"] = first.inner_text("#feed li.note.ok")
        finally:
            context.close()
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])), flush=True)
