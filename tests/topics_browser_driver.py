"""Open a multi-topic EventSource in headless Chromium (Debian's /usr/bin/chromium).

Run by tests/test_topics_browser.py in its own process (Playwright's sync API
must not meet gevent's monkey-patching). Talks to the test over stdin/stdout:
prints a step name, waits for "done"; prints one JSON object at the end.

    python tests/topics_browser_driver.py http://127.0.0.1:8000          # the test page
    python tests/topics_browser_driver.py http://127.0.0.1:8000 demo     # the demo's tab topic
"""

from __future__ import annotations

import json
import sys
import tempfile
from typing import Any

from playwright.sync_api import sync_playwright

from tests.browser_driver import CHROMIUM, FLAGS, TIMEOUT_MS


def _handshake(what: str) -> None:
    print(what, flush=True)
    if sys.stdin.readline().strip() != "done":
        raise SystemExit(f"the test did not {what}")


def main(url: str) -> dict[str, Any]:
    out: dict[str, Any] = {"page_errors": []}
    with tempfile.TemporaryDirectory(prefix="gstream-chromium-") as profile, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=FLAGS)
        context.set_default_timeout(TIMEOUT_MS)
        try:
            page = context.new_page()
            page.on("pageerror", lambda exc: out["page_errors"].append(str(exc)))
            page.goto(url + "/")
            page.wait_for_function("window.opens === 1")
            _handshake("publish")  # the test publishes on three topics (one not asked for)
            page.wait_for_function("window.got.length >= 4")
            _handshake("stop")  # the test stops the server and publishes while it is down
            page.wait_for_function("window.errors >= 1")
            _handshake("start")  # a new server on the same port: EventSource resumes by itself
            page.wait_for_function("window.opens === 2 && window.got.length >= 8")
            out["got"] = page.evaluate("window.got")
        finally:
            context.close()
    return out


def demo(url: str) -> dict[str, Any]:
    """Two demo tabs: a message to one tab's private topic shows only there."""
    out: dict[str, Any] = {"page_errors": []}
    with tempfile.TemporaryDirectory(prefix="gstream-chromium-") as profile, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=FLAGS)
        context.set_default_timeout(TIMEOUT_MS)
        try:
            first, second = context.new_page(), context.new_page()
            for page in (first, second):
                page.on("pageerror", lambda exc: out["page_errors"].append(str(exc)))
                page.goto(url + "/")
                page.wait_for_selector("#feed-status[data-state=live]")
            first.fill("#publish-text", "just for tab one")
            first.click("#publish-tab")
            first.wait_for_selector("#feed li.event.private:has-text('just for tab one')")
            second.fill("#publish-text", "for everyone")
            second.click("#publish-form button[type=submit]")
            for page in (first, second):
                page.wait_for_selector("#feed li.event.shared:has-text('for everyone')")
            out["second_private"] = second.eval_on_selector_all("#feed li.private", "els => els.length")
            out["first_texts"] = first.eval_on_selector_all(
                "#feed li.event .text", "els => els.map(e => e.textContent)")
            out["tabs"] = [page.evaluate("feed.tab") for page in (first, second)]
        finally:
            context.close()
    return out


if __name__ == "__main__":
    result = demo(sys.argv[1]) if sys.argv[2:] == ["demo"] else main(sys.argv[1])
    print(json.dumps(result), flush=True)
