"""gstream behind a real nginx (and Caddy) terminating TLS, with the guide's configurations.

nginx runs in the foreground with its own prefix and temp dirs on a free
127.0.0.1 port, with a throwaway self-signed certificate, and the very file
docs/deploy.md shows (examples/deploy/nginx.conf; only addresses, paths and
the read timeout are substituted); Caddy likewise (examples/deploy/Caddyfile).
Behind them: ``gstream serve`` and gstream's gunicorn workers, as
subprocesses, serving tests/apps/proxied.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
import pytest
import requests

from gstream.client import SSEClient, connect
from gstream.errors import Closed
from tests import examples_support as ex
from tests.tlsutil import client_context, make_cert

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "examples" / "deploy" / "nginx.conf"
CADDYFILE = ROOT / "examples" / "deploy" / "Caddyfile"
GUIDE = ROOT / "docs" / "deploy.md"
DRIVER = ROOT / "tests" / "proxy_browser_driver.py"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
CADDY = shutil.which("caddy") or "/usr/bin/caddy"

BACKENDS = {
    "gstream": None,
    "gunicorn-gevent": "gstream.contrib.gunicorn.GeventWorker",
    "gunicorn-pywsgi": "gstream.contrib.gunicorn.GeventPyWSGIWorker",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _substitute(text: str, changes: dict[str, str]) -> str:
    for old, new in changes.items():
        assert text.count(old) == 1, f"{old!r} is not in the configuration exactly once"
        text = text.replace(old, new)
    return text


class Nginx:
    """nginx in the foreground, proxying https://127.0.0.1:port to ``upstream_port``."""

    def __init__(self, workdir: Path, upstream_port: int, read_timeout: str = "90s") -> None:
        self.dir = workdir / "nginx"
        self.dir.mkdir()
        cert, key = make_cert(str(self.dir))
        self.cert = cert
        self.port = _free_port()
        site = _substitute(CONF.read_text(), {
            "server 127.0.0.1:8000;": f"server 127.0.0.1:{upstream_port};",
            "listen 443 ssl http2;": f"listen 127.0.0.1:{self.port} ssl http2;",
            "listen 80;": f"listen 127.0.0.1:{_free_port()};",
            "/etc/ssl/certs/example.com.pem": cert,
            "/etc/ssl/private/example.com.key": key,
            "proxy_read_timeout 90s;": f"proxy_read_timeout {read_timeout};",
        })
        (self.dir / "gstream.conf").write_text(site)
        d = self.dir
        (d / "nginx.conf").write_text(f"""
daemon off;
master_process off;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 512; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    include {d}/gstream.conf;
}}
""")
        self.p = subprocess.Popen([NGINX, "-p", str(d), "-c", str(d / "nginx.conf"),
                                   "-e", str(d / "error.log")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.url = f"https://127.0.0.1:{self.port}"
        self.wait_listening(10, "nginx")

    def wait_listening(self, seconds: float, name: str) -> None:
        """Until the proxy accepts on its port; fails if it exits or takes longer."""
        with gevent.Timeout(seconds, AssertionError(f"{name} did not start: {self.errors()}")):
            while True:
                assert self.p.poll() is None, self.errors()
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                    return
                except OSError:
                    gevent.sleep(0.05)

    def ssl(self) -> Any:
        return client_context(self.cert)

    def errors(self) -> str:
        path = self.dir / "error.log"
        return path.read_text()[-3000:] if path.exists() else ""

    def access_log(self) -> str:
        path = self.dir / "access.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(5)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)


class Caddy(Nginx):
    """Caddy in the foreground (no admin endpoint), proxying https://127.0.0.1:port."""

    def __init__(self, workdir: Path, upstream_port: int, read_timeout: str = "") -> None:
        self.dir = workdir / "caddy"
        self.dir.mkdir()
        cert, key = make_cert(str(self.dir))
        self.cert = cert
        self.port = _free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        site = _substitute(CADDYFILE.read_text(), {
            "example.com {": f"{self.url} {{",
            "# tls /etc/ssl/certs/example.com.pem /etc/ssl/private/example.com.key":
                f"tls {cert} {key}",
            "reverse_proxy 127.0.0.1:8000": f"reverse_proxy 127.0.0.1:{upstream_port}",
        })
        # Global options of the test only: no admin port, no certificate
        # management or :80 redirects, nothing written outside the test's dir.
        config = self.dir / "Caddyfile"
        config.write_text("{\n\tadmin off\n\tauto_https off\n"
                          f"\tstorage file_system {self.dir}/data\n}}\n\n" + site)
        self.log_path = self.dir / "caddy.log"
        env = dict(os.environ, HOME=str(self.dir), XDG_DATA_HOME=str(self.dir / "data"),
                   XDG_CONFIG_HOME=str(self.dir / "config"))
        with open(self.log_path, "w") as log:
            self.p = subprocess.Popen([CADDY, "run", "--config", str(config), "--adapter", "caddyfile"],
                                      stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.dir)
        self.wait_listening(15, "caddy")

    def errors(self) -> str:
        return self.log_path.read_text()[-3000:] if self.log_path.exists() else ""

    def access_log(self) -> str:
        return ""  # the guide's Caddyfile has no access log


def _backend(kind: str, tmp_path: Path, env: dict[str, str] | None = None) -> ex.ExampleServer:
    worker = BACKENDS[kind]
    if worker is None:
        return ex.ExampleServer("gstream", "tests.apps.proxied:app", env or {}, tmp_path)
    return ex.ExampleServer("gunicorn", "tests.apps.proxied:app", env or {}, tmp_path, worker=worker)


PROXIES = {"nginx": Nginx, "caddy": Caddy}
# (proxy, backend): nginx in front of every backend; Caddy in front of gstream serve.
STACKS = [("nginx", k) for k in BACKENDS] + [("caddy", "gstream")]
STACK_IDS = [f"{p}-{b}" for p, b in STACKS]


@pytest.fixture
def stack(request: Any, tmp_path: Path) -> Iterator[tuple[ex.ExampleServer, Nginx]]:
    proxy, kind, read_timeout = request.param
    if not os.path.exists(NGINX if proxy == "nginx" else CADDY):
        pytest.skip(f"needs {proxy} (Debian's)")
    ex.raise_fd_limit()
    backend = _backend(kind, tmp_path)
    nginx = None
    try:
        nginx = PROXIES[proxy](tmp_path, backend.port, read_timeout)
        yield backend, nginx
    finally:
        if nginx is not None:
            nginx.stop()
        backend.stop()


def test_guide_shows_the_tested_configurations() -> None:
    guide = GUIDE.read_text()
    assert CONF.read_text() in re.findall(r"```nginx\n(.*?)```", guide, re.S), (
        "docs/deploy.md must show examples/deploy/nginx.conf verbatim")
    assert CADDYFILE.read_text() in re.findall(r"```caddyfile\n(.*?)```", guide, re.S), (
        "docs/deploy.md must show examples/deploy/Caddyfile verbatim")


@pytest.mark.browser
@pytest.mark.skipif(not os.path.exists("/usr/bin/chromium"), reason="needs /usr/bin/chromium")
@pytest.mark.parametrize("stack", [(p, b, "90s") for p, b in STACKS], indirect=True, ids=STACK_IDS)
def test_browser_over_https_and_wss(stack: tuple[ex.ExampleServer, Nginx], tmp_path: Path) -> None:
    backend, nginx = stack
    # The other origin: the backend itself, over plain http on its own port.
    result = subprocess.run(
        [sys.executable, str(DRIVER), nginx.url, backend.url], cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["origin"] == nginx.url and seen["page_errors"] == []

    # The page's own WebSocket: same origin through the TLS proxy, echoed.
    ws = seen["same_origin_ws"]
    assert ws["opened"] and ws["messages"] == ["hello through the proxy"] and ws["code"] == 1000, (
        ws, nginx.access_log()[-2000:], backend.logs())

    # EventSource resumed after the stream ended: n3 and n4 came by replay,
    # asked for with the Last-Event-ID header that went through nginx.
    sse = seen["sse"]
    assert [e["data"] for e in sse["got"]] == ["n1", "n2", "n3", "n4"], sse
    assert sse["opens"] >= 2
    assert sse["who"]["last_event_id"] == sse["got"][1]["id"]
    assert sse["who"]["scheme"] == "https" and sse["who"]["remote_addr"] == "127.0.0.1"
    assert sse["who"]["host"] == f"127.0.0.1:{nginx.port}"

    # A page from another origin cannot open a WebSocket to the site: 403.
    assert seen["other_origin"] == backend.url
    other = seen["other_origin_ws"]
    assert not other["opened"] and other["messages"] == [] and other["code"] == 1006, other
    if isinstance(nginx, Caddy):
        return
    log = nginx.access_log()
    assert re.search(r'"GET /echo HTTP/1\.1" 403 ', log), log[-2000:]
    assert re.search(r'"GET /echo HTTP/1\.1" 101 ', log), log[-2000:]


def _reader(client: SSEClient, out: list[Any]) -> gevent.Greenlet:
    def read() -> None:
        try:
            for event in client:
                out.append(event)
        except Exception as exc:  # noqa: BLE001 - how it ended is the result
            out.append(exc)

    return gevent.spawn(read)


@pytest.mark.parametrize("stack", [("nginx", "gstream", "2s")], indirect=True, ids=["nginx-gstream"])
def test_heartbeats_outlive_proxy_read_timeout(stack: tuple[ex.ExampleServer, Nginx]) -> None:
    """nginx cuts an upstream silent for proxy_read_timeout (2 s here); the app's
    heartbeats (1 s: SSE comments, WebSocket pings) keep idle streams open."""
    backend, nginx = stack
    ctx = nginx.ssl()
    beating = SSEClient(nginx.url + "/events", reconnect=False, ssl_context=ctx)
    silent = SSEClient(nginx.url + "/quiet", reconnect=False, ssl_context=ctx)
    got: list[Any] = []
    cut: list[Any] = []
    readers = [_reader(beating, got), _reader(silent, cut)]
    ws = connect(nginx.url.replace("https", "wss") + "/echo", ssl_context=ctx)
    ws_silent = connect(nginx.url.replace("https", "wss") + "/echo-quiet", ssl_context=ctx)
    try:
        t0 = time.monotonic()
        gevent.sleep(4.5)  # idle: more than twice nginx's read timeout
        # The control: without heartbeats nginx has closed both.
        assert readers[1].dead and time.monotonic() - t0 >= 1.5
        with pytest.raises(Closed), gevent.Timeout(3):
            ws_silent.recv(timeout=3)
        # With them, the same connections still carry traffic.
        assert not readers[0].dead and got == []
        event_id = requests.post(nginx.url + "/publish?data=still+here", verify=nginx.cert,
                                 timeout=5).json()["id"]
        with gevent.Timeout(5):
            while not got:
                gevent.sleep(0.05)
        assert got[0].data == "still here" and got[0].last_event_id == event_id
        ws.send("still open")
        assert ws.recv(timeout=5) == "still open"
        assert "upstream timed out" in nginx.errors()  # nginx did cut the silent ones
    finally:
        for client in (beating, silent):
            client.close()
        ws.close()
        ws_silent.close()
        gevent.killall(readers, timeout=2)


@pytest.mark.parametrize("stack", [(p, b, "90s") for p, b in STACKS], indirect=True, ids=STACK_IDS)
def test_sigterm_behind_nginx_ends_streams_politely(stack: tuple[ex.ExampleServer, Nginx]) -> None:
    backend, nginx = stack
    ctx = nginx.ssl()
    # First, a client's own proxy headers do not get through the proxy.
    spoof = {"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "http",
             "Forwarded": "for=6.6.6.6;proto=http"}
    seen = requests.get(nginx.url + "/whoami", headers=spoof, verify=nginx.cert, timeout=5).json()
    assert (seen["scheme"], seen["remote_addr"]) == ("https", "127.0.0.1"), seen
    clients = [SSEClient(nginx.url + "/events", reconnect=False, ssl_context=ctx) for _ in range(2)]
    outs: list[list[Any]] = [[] for _ in clients]
    readers = [_reader(c, out) for c, out in zip(clients, outs, strict=True)]
    sockets = [connect(nginx.url.replace("https", "wss") + "/echo", ssl_context=ctx)
               for _ in range(2)]
    try:
        for ws in sockets:
            ws.send("before")
            assert ws.recv(timeout=5) == "before"
        requests.post(nginx.url + "/publish?data=live", verify=nginx.cert, timeout=5)
        with gevent.Timeout(5):  # both streams are subscribed and delivering
            while not all(out for out in outs):
                gevent.sleep(0.05)
        t0 = time.monotonic()
        backend.p.send_signal(signal.SIGTERM)
        gevent.joinall(readers, timeout=5)
        for out, client in zip(outs, clients, strict=True):
            assert [getattr(e, "data", e) for e in out][0] == "live", out
            # The final event is a named event; the client yields it like any other.
            assert getattr(out[-1], "event", None) == "gstream.shutdown", out
            assert client.retry_ms == 300
        for ws in sockets:
            with pytest.raises(Closed), gevent.Timeout(5):
                while True:
                    ws.recv(timeout=5)
            assert ws.close_code == 1001, (ws.close_code, ws.close_reason)
        assert backend.p.wait(8) == 0, backend.logs()
        assert time.monotonic() - t0 < 6
    finally:
        for c in clients:
            c.close()
        for ws in sockets:
            ws.close()
        gevent.killall(readers, timeout=2)
