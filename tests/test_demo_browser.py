"""The demo page in a real headless Chromium: feed events arrive, chat crosses pages,
statistics update. Chromium is Debian's (/usr/bin/chromium), driven with Playwright
from a separate process (tests/browser_driver.py), never ``playwright install``.

Regenerate the README screenshot with::

    GSTREAM_DEMO_SCREENSHOT=docs/demo.png python -m pytest tests/test_demo_browser.py
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import gevent
import pytest

from tests.test_demo import Proc

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
DRIVER = ROOT / "tests" / "browser_driver.py"


@pytest.mark.skipif(not os.path.exists("/usr/bin/chromium"), reason="needs /usr/bin/chromium")
def test_demo_in_chromium(tmp_path: Path) -> None:
    demos = [Proc("demo")]
    shot = tmp_path / "demo.png"
    driver = subprocess.Popen(
        [sys.executable, str(DRIVER), demos[0].url, str(shot)], cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)), stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=(tmp_path / "driver.log").open("w"), text=True)
    assert driver.stdin is not None and driver.stdout is not None
    seen: dict[str, Any] = {}
    try:
        with gevent.Timeout(60, AssertionError("the browser driver took too long")):
            for line in driver.stdout:
                line = line.strip()
                if line == "stop":  # the page must show "reconnecting"
                    demos[-1].p.send_signal(signal.SIGTERM)
                    assert demos[-1].p.wait(10) == 0
                elif line == "start":  # same port: the page resumes by itself
                    demos.append(Proc("demo", port=demos[0].port))
                elif line.startswith("{"):
                    seen = json.loads(line)
                    continue
                else:
                    continue
                driver.stdin.write("done\n")
                driver.stdin.flush()
            assert driver.wait(10) == 0, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(5)
        for demo in demos:
            if demo.p.poll() is None:
                demo.p.send_signal(signal.SIGTERM)
                assert demo.p.wait(10) == 0
            demo.stop()

    ids = [int(i) for i in seen["feed_ids"]]
    assert len(ids) >= 2 and ids == sorted(ids, reverse=True)  # newest first, in order
    assert int(seen["feed_last_id"]) >= ids[0]
    assert "Alice" in seen["second_sees"] and "hello from page one" in seen["second_sees"]
    assert "Bob" in seen["first_sees"]
    assert seen["published_seen"] is True
    # The chat room's presence list: names, a third page in and out.
    assert "Alice" in seen["presence_first"] and "Bob" in seen["presence_first"]
    assert seen["presence_count"] == "2"
    # The third page takes the saved name (localStorage): a second "Bob", another member.
    assert "Alice" in seen["presence_third"] and seen["presence_third"].count("Bob") == 2
    assert seen["presence_after_leave"].count("Bob") == 1
    assert seen["stats"]["ws"] == "2" and int(seen["stats"]["connections"]) >= 4
    assert seen["statuses"] == ["live", "live", "live"]
    assert seen["console_errors_before_restart"] == [] and seen["page_errors"] == []
    assert seen["reconnecting_shown"] is True and "resumed after id" in seen["resumed"]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    target = os.environ.get("GSTREAM_DEMO_SCREENSHOT")
    if target:
        shutil.copyfile(shot, ROOT / target)
