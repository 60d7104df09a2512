"""Proxy headers (gstream/proxy.py): the rules on environs, then real servers on 127.0.0.1.

A real client on 127.0.0.1 is the "proxy" here: gstream's server trusts it by
default (loopback), and the same request to a server trusting another
address shows that an untrusted peer cannot set its scheme, address or host.
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests

from gstream import HandshakeError
from gstream.cli import main as cli_main
from gstream.client import connect
from gstream.handler import GStreamHandler
from gstream.proxy import PEER_KEY, ProxyHeaders, parse_forwarded
from tests import examples_support as ex
from tests.apps.proxied import app as proxied_app
from tests.helpers import raw_http, read_response_head, wait_until

# -- the rules, on plain environs ----------------------------------------------


def _env(peer: str | None = "127.0.0.1", **headers: str) -> dict[str, Any]:
    env: dict[str, Any] = {"wsgi.url_scheme": "http", "HTTP_HOST": "backend:8000",
                           "REMOTE_PORT": "50000"}
    if peer is not None:
        env["REMOTE_ADDR"] = peer
    env.update({"HTTP_" + k.upper(): v for k, v in headers.items()})
    return env


def test_trusted_peer_sets_scheme_client_and_host() -> None:
    env = _env(x_forwarded_proto="https", x_forwarded_for="203.0.113.7",
               x_forwarded_host="app.example:8443")
    assert ProxyHeaders().apply(env) is True
    assert (env["wsgi.url_scheme"], env["REMOTE_ADDR"], env["HTTP_HOST"]) == (
        "https", "203.0.113.7", "app.example:8443")
    assert env[PEER_KEY] == "127.0.0.1"  # the proxy's own address


def test_untrusted_peer_is_ignored() -> None:
    for peer in ("198.51.100.1", "127.0.0.2", "not-an-ip"):
        env = _env(peer, x_forwarded_proto="https", x_forwarded_for="10.9.9.9",
                   x_forwarded_host="evil.example", forwarded="for=10.8.8.8;proto=https")
        before = dict(env)
        assert ProxyHeaders().apply(env) is False
        assert env == before


def test_allow_list_forms() -> None:
    nets = ProxyHeaders("10.0.0.0/8, 192.0.2.1")
    assert nets.trusts("10.1.2.3") and nets.trusts("192.0.2.1") and not nets.trusts("192.0.2.2")
    assert nets.trusts("::ffff:10.0.0.1")  # a dual-stack socket's IPv4 peer
    assert ProxyHeaders(["::1"]).trusts("::1") and not ProxyHeaders(["::1"]).trusts("127.0.0.1")
    assert ProxyHeaders("*").trusts("198.51.100.9")
    assert ProxyHeaders().trusts("") and ProxyHeaders().trusts(None)  # a Unix socket, as gunicorn
    assert not ProxyHeaders("").trusts("127.0.0.1")
    for bad in ("10.0.0/8", "localhost", "1.2.3.4/33"):
        with pytest.raises(ValueError, match="forwarded_allow_ips"):
            ProxyHeaders(bad)


def test_forwarded_for_chain_skips_trusted_proxies_only() -> None:
    trust = ProxyHeaders("127.0.0.1,10.0.0.0/8")
    # A client-supplied entry stays on the left of what the trusted proxies appended.
    env = _env(x_forwarded_for="6.6.6.6, 203.0.113.5, 10.0.0.2")
    trust.apply(env)
    assert env["REMOTE_ADDR"] == "203.0.113.5"
    env = _env(x_forwarded_for="10.0.0.3, 10.0.0.2")  # every hop trusted: the first
    trust.apply(env)
    assert env["REMOTE_ADDR"] == "10.0.0.3"
    env = _env(x_forwarded_for="[2001:db8::1]:4711")
    trust.apply(env)
    assert (env["REMOTE_ADDR"], env["REMOTE_PORT"]) == ("2001:db8::1", "4711")
    env = _env(x_forwarded_for="203.0.113.5:81")
    trust.apply(env)
    assert (env["REMOTE_ADDR"], env["REMOTE_PORT"]) == ("203.0.113.5", "81")


def test_nearest_proxy_gives_scheme_and_host() -> None:
    env = _env(x_forwarded_proto="http, https", x_forwarded_host="a.example, b.example")
    ProxyHeaders().apply(env)
    assert env["wsgi.url_scheme"] == "https" and env["HTTP_HOST"] == "b.example"
    env = _env(x_forwarded_proto="wss")
    ProxyHeaders().apply(env)
    assert env["wsgi.url_scheme"] == "https"


def test_bad_values_are_ignored_with_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", "gstream.proxy")
    env = _env(x_forwarded_proto="ftp", x_forwarded_for="999.1.1.1",
               x_forwarded_host="evil.example/path\\x")
    before = dict(env)
    assert ProxyHeaders().apply(env) is False
    assert env == before
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert "not http or https" in lines[1] and "host[:port]" in lines[2]
    caplog.clear()
    env = _env(x_forwarded_for="unknown")  # RFC 7239's own word: no log
    ProxyHeaders().apply(env)
    assert env["REMOTE_ADDR"] == "127.0.0.1" and caplog.records == []


def test_rfc7239_forwarded() -> None:
    assert parse_forwarded('for=192.0.2.60;proto=http;by=203.0.113.43, for="[2001:db8::1]:4711"') == [
        {"for": "192.0.2.60", "proto": "http", "by": "203.0.113.43"}, {"for": "[2001:db8::1]:4711"}]
    assert parse_forwarded('For="a\\"b";PROTO=https') == [{"for": 'a"b', "proto": "https"}]
    for bad in ("junk", "for=1.2.3.4 x", "for=1;for=2", 'for="unterminated'):
        assert parse_forwarded(bad) is None, bad
    trust = ProxyHeaders("127.0.0.1,10.0.0.0/8")
    # The element of the hop the walk stops at describes the client's own connection.
    env = _env(forwarded='for=203.0.113.9;proto=https;host="app.example", for=10.0.0.5;proto=http')
    assert trust.apply(env)
    assert (env["REMOTE_ADDR"], env["wsgi.url_scheme"], env["HTTP_HOST"]) == (
        "203.0.113.9", "https", "app.example")
    env = _env(forwarded="for=_hidden;proto=https")  # obfuscated: the address stays
    trust.apply(env)
    assert (env["REMOTE_ADDR"], env["wsgi.url_scheme"]) == ("127.0.0.1", "https")
    env = _env(forwarded="for=nonsense garbage")
    assert trust.apply(env) is False


def test_x_forwarded_headers_win_over_forwarded() -> None:
    # nginx sets X-Forwarded-* and passes a client's own Forwarded header on.
    env = _env(x_forwarded_for="198.51.100.4", forwarded="for=6.6.6.6;proto=https;host=evil")
    ProxyHeaders().apply(env)
    assert (env["REMOTE_ADDR"], env["wsgi.url_scheme"], env["HTTP_HOST"]) == (
        "198.51.100.4", "http", "backend:8000")


# -- gstream's server, plain pywsgi, the CLI -----------------------------------

PROXIED = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.7",
           "X-Forwarded-Host": "app.example"}


def _whoami(url: str) -> dict[str, Any]:
    r = requests.get(url + "/whoami", headers=PROXIED, timeout=5)
    assert r.status_code == 200
    return dict(r.json())


def _ws_origin_check(url: str, origin: str = "https://app.example",
                     headers: dict[str, str] = PROXIED) -> int:
    """101 or the refusal status of an https page's WebSocket sent through a "proxy"."""
    try:
        with connect(url.replace("http://", "ws://") + "/echo", origin=origin,
                     headers=headers) as ws:
            ws.send("hi")
            assert ws.recv(timeout=5) == "hi"
            return 101
    except HandshakeError as exc:
        return exc.status


def test_server_trusts_loopback_by_default_and_no_one_else(gserver: Any) -> None:
    trusted = gserver(proxied_app)
    seen = _whoami(trusted.url)
    assert (seen["scheme"], seen["remote_addr"], seen["host"]) == ("https", "203.0.113.7", "app.example")
    assert _ws_origin_check(trusted.url) == 101  # the https page's WebSocket: same origin
    # A direct client of a server that trusts only its proxy (192.0.2.1) cannot spoof.
    direct = gserver(proxied_app, forwarded_allow_ips="192.0.2.1")
    seen = _whoami(direct.url)
    assert (seen["scheme"], seen["remote_addr"], seen["host"]) == (
        "http", "127.0.0.1", f"127.0.0.1:{direct.port}")
    assert _ws_origin_check(direct.url) == 403
    off = gserver(proxied_app, forwarded_allow_ips=None)
    assert _whoami(off.url)["scheme"] == "http" and _ws_origin_check(off.url) == 403
    with pytest.raises(ValueError, match="not an IP address"):
        gserver(proxied_app, forwarded_allow_ips="proxy.example")


def test_access_log_names_the_client_not_the_proxy(gserver: Any, caplog: Any) -> None:
    # The access line's address is the environ's REMOTE_ADDR (after the proxy
    # headers), not the peer's: behind a proxy every line would name the proxy.
    srv = gserver(proxied_app, access_log=True, header_timeout=0.5)
    direct = gserver(proxied_app, access_log=True, forwarded_allow_ips="192.0.2.1")
    with caplog.at_level(logging.INFO, logger="gstream.access"):
        _whoami(srv.url)
        _whoami(direct.url)  # an untrusted peer: its own address
        # A head that never completes (408, no environ for it) names the peer,
        # even on a connection whose previous request came through the proxy.
        head = "".join(f"{k}: {v}\r\n" for k, v in PROXIED.items())
        conn = raw_http(srv.port, f"GET /whoami HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode())
        try:
            assert read_response_head(conn)[0] == 200
            conn.sendall(b"GET /whoami HTTP/1.1\r\nHost: x\r\n")  # and no more
            conn.settimeout(5)
            rest = b""
            while chunk := conn.recv(4096):
                rest += chunk
            assert b"HTTP/1.1 408 " in rest
        finally:
            conn.close()

        def lines() -> list[str]:
            return [r.getMessage() for r in caplog.records if r.name == "gstream.access"]

        assert wait_until(lambda: len(lines()) == 4)
    first, second, third, fourth = lines()
    assert first.startswith("203.0.113.7 - - [") and "GET /whoami" in first
    assert second.startswith("127.0.0.1 - - [")
    assert third.startswith("203.0.113.7 - - [")
    assert fourth.startswith("127.0.0.1 - - [") and '" 408 ' in fourth


def test_plain_pywsgi_opts_in_with_a_handler_subclass(serve: Any) -> None:
    class Behind(GStreamHandler):
        proxy_headers = ProxyHeaders("127.0.0.1")

    srv = serve(proxied_app, handler_class=Behind)
    seen = _whoami(srv.url)
    assert (seen["scheme"], seen["remote_addr"], seen["host"]) == ("https", "203.0.113.7", "app.example")
    assert _ws_origin_check(srv.url) == 101
    plain = serve(proxied_app, handler_class=GStreamHandler)  # not opted in: unchanged
    assert _whoami(plain.url)["scheme"] == "http" and _ws_origin_check(plain.url) == 403


def test_plain_pywsgi_access_line_names_the_forwarded_client(serve: Any) -> None:
    # Under plain pywsgi the access line is pywsgi's log, formatted by
    # GStreamHandler: behind the proxy it names the client, not the proxy.
    class Behind(GStreamHandler):
        proxy_headers = ProxyHeaders("127.0.0.1")

    for handler, first in ((Behind, "203.0.113.7 - - ["), (GStreamHandler, "127.0.0.1 - - [")):
        out = io.StringIO()
        srv = serve(proxied_app, handler_class=handler, log=out)
        _whoami(srv.url)
        assert wait_until(lambda out=out: "/whoami" in out.getvalue())
        line = out.getvalue().splitlines()[0]
        assert line.startswith(first) and '" 200 ' in line, line


def test_cli_option(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        cli_main(["serve", "tests.apps.proxied:app", "--forwarded-allow-ips", "10.0.0/8"])
    out = subprocess.run([sys.executable, "-m", "gstream", "serve", "--help"],
                         capture_output=True, text=True, timeout=30)
    assert "--forwarded-allow-ips" in out.stdout
    for allow, scheme in (("127.0.0.1", "https"), ("192.0.2.1", "http")):
        srv = _CliServer(tmp_path, ["--forwarded-allow-ips", allow])
        try:
            assert _whoami(srv.url)["scheme"] == scheme
        finally:
            assert srv.stop() == 0, srv.logs()


class _CliServer(ex.ExampleServer):
    """``python -m gstream serve tests.apps.proxied:app ARGS`` on a free port."""

    def __init__(self, logdir: Path, args: list[str]) -> None:
        self.kind = "gstream"
        self.log_path = logdir / "cli.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 - lives as long as the server
        cmd = [sys.executable, "-m", "gstream", "serve", "tests.apps.proxied:app", "--port", "0",
               "--log-level", "warning", *args]
        self.p = subprocess.Popen(cmd, cwd=ex.ROOT, env=dict(os.environ, PYTHONPATH=ex.ROOT),
                                  stdout=subprocess.PIPE, stderr=self.log, text=True)
        self._wait_ready()


# -- gunicorn's --forwarded-allow-ips in gstream's pywsgi worker ---------------


@pytest.mark.parametrize("worker", ["GeventWorker", "GeventPyWSGIWorker"])
def test_gunicorn_workers_follow_forwarded_allow_ips(tmp_path: Path, worker: str) -> None:
    """gunicorn's rule: only the scheme follows the proxy (secure_scheme_headers);
    the address and Host stay the peer's (nginx passes the client's Host on)."""
    pytest.importorskip("gunicorn")
    srv = ex.ExampleServer("gunicorn", "tests.apps.proxied:app", {}, tmp_path,
                           worker=f"gstream.contrib.gunicorn.{worker}")
    https_page = {"origin": f"https://127.0.0.1:{srv.port}",
                  "headers": {"X-Forwarded-Proto": "https"}}
    try:
        seen = _whoami(srv.url)
        assert (seen["scheme"], seen["remote_addr"]) == ("https", "127.0.0.1")  # loopback: trusted
        assert _ws_origin_check(srv.url, **https_page) == 101
        r = requests.get(srv.url + "/whoami", timeout=5,
                         headers={"X-Forwarded-Proto": "https", "X-Forwarded-Ssl": "off"})
        assert r.status_code == 400  # gunicorn's rule: contradicting scheme headers
        assert requests.get(srv.url + "/whoami", timeout=5).json()["scheme"] == "http"
    finally:
        assert srv.stop() == 0, srv.logs()
    env = {"FORWARDED_ALLOW_IPS": "192.0.2.1"}  # gunicorn's own default source
    srv = ex.ExampleServer("gunicorn", "tests.apps.proxied:app", env, tmp_path,
                           worker=f"gstream.contrib.gunicorn.{worker}")
    https_page["origin"] = f"https://127.0.0.1:{srv.port}"
    try:
        assert _whoami(srv.url)["scheme"] == "http"
        assert _ws_origin_check(srv.url, **https_page) == 403
    finally:
        assert srv.stop() == 0, srv.logs()

