"""Headless Chromium against the proxied test app (tests/apps/proxied.py) behind nginx.

Run by tests/test_behind_nginx.py in its own process (Playwright's sync API
must not meet gevent's monkey-patching). Prints one JSON object:

    python tests/proxy_browser_driver.py https://127.0.0.1:8443 http://127.0.0.1:8000

The first URL is the site (nginx, TLS with a throwaway certificate); the
second is another origin, whose page opens a WebSocket to the site.
"""

from __future__ import annotations

import json
import sys
import tempfile
from typing import Any

from playwright.sync_api import sync_playwright

from tests.browser_driver import CHROMIUM, FLAGS, TIMEOUT_MS

# An echo round trip; resolves with what the page saw.
WEBSOCKET = """async (url) => new Promise((resolve) => {
  const out = {opened: false, messages: [], code: null, error: false};
  const ws = new WebSocket(url);
  const timer = setTimeout(() => { out.timeout = true; resolve(out); }, 8000);
  ws.onopen = () => { out.opened = true; ws.send('hello through the proxy'); };
  ws.onmessage = (e) => { out.messages.push(e.data); ws.close(1000, 'done'); };
  ws.onerror = () => { out.error = true; };
  ws.onclose = (e) => { out.code = e.code; clearTimeout(timer); resolve(out); };
})"""

# EventSource sees n1, n2; the server ends the stream and publishes n3, n4
# before the browser reconnects (retry: 300 ms): they arrive only by resuming
# from Last-Event-ID.
SSE_RESUME = """async () => {
  const got = [];
  let opens = 0;
  const until = (pred, ms, what) => new Promise((resolve, reject) => {
    const t0 = Date.now();
    const iv = setInterval(() => {
      if (pred()) { clearInterval(iv); resolve(); }
      else if (Date.now() - t0 > ms) { clearInterval(iv); reject(new Error('timed out: ' + what)); }
    }, 20);
  });
  const es = new EventSource('/events');
  es.onopen = () => { opens += 1; };
  es.onmessage = (e) => got.push({id: e.lastEventId, data: e.data});
  try {
    await until(() => opens >= 1, 5000, 'open');
    for (const d of ['n1', 'n2']) await fetch('/publish?data=' + d, {method: 'POST'});
    await until(() => got.length >= 2, 5000, 'n1 n2');
    await fetch('/cut?then=n3&then=n4', {method: 'POST'});
    await until(() => opens >= 2 && got.length >= 4, 10000, 'resume');
  } finally {
    es.close();
  }
  const who = await (await fetch('/whoami')).json();
  return {opens, got, who};
}"""


def main(site: str, other: str) -> dict[str, Any]:
    out: dict[str, Any] = {"page_errors": []}
    with tempfile.TemporaryDirectory(prefix="gstream-chromium-") as profile, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True,
            args=[*FLAGS, "--ignore-certificate-errors"], ignore_https_errors=True)
        context.set_default_timeout(TIMEOUT_MS)
        try:
            page = context.new_page()
            page.on("pageerror", lambda exc: out["page_errors"].append(str(exc)))
            page.goto(site + "/")
            out["origin"] = page.evaluate("location.origin")
            wss = site.replace("https://", "wss://") + "/echo"
            out["same_origin_ws"] = page.evaluate(WEBSOCKET, wss)
            out["sse"] = page.evaluate(SSE_RESUME)
            stranger = context.new_page()
            stranger.goto(other + "/")
            out["other_origin"] = stranger.evaluate("location.origin")
            out["other_origin_ws"] = stranger.evaluate(WEBSOCKET, wss)
        finally:
            context.close()
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])), flush=True)
