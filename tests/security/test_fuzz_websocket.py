"""Property-based tests (hypothesis) for WebSocket entry points over real
sockets: random frame streams after a valid handshake, and random upgrade
requests. The server never raises an unhandled exception, never leaks a
greenlet or a connection, and always ends with a valid close code or HTTP
status."""

from __future__ import annotations

import socket
import struct

import gevent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gstream.client import connect
from gstream.websocket import WSConfig, open_connections
from tests import wsraw
from tests.helpers import read_response_head, wait_until
from tests.leakcheck import LeakCheck
from tests.security.apps import SecurityApp

FUZZ = settings(max_examples=100, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
CFG = WSConfig(read_limit=4096, close_timeout=0.2, read_idle_timeout=0.5, pong_timeout=0.3,
               compression=True)

# RFC 6455 7.4: codes a server may send, plus 1006 recorded locally (no close frame).
VALID_SENT = set(range(1000, 1004)) | set(range(1007, 1012)) | set(range(3000, 5000))


def _frame(opcode: int, payload: bytes, fin: bool, rsv: int, mask: bool, lie: int | None) -> bytes:
    return wsraw.frame(opcode, payload, fin=fin, mask=mask, rsv=rsv, length=lie)


FRAMES = st.lists(
    st.one_of(
        st.builds(_frame, st.integers(0, 15), st.binary(max_size=200), st.booleans(),
                  st.integers(0, 7), st.sampled_from([True, True, True, False]),
                  st.one_of(st.none(), st.none(), st.integers(0, 300),
                            st.sampled_from([1 << 63, (1 << 64) - 1, 65536]))),
        st.builds(lambda c, r: wsraw.close_frame(c, r), st.integers(0, 6000), st.binary(max_size=20)),
        st.builds(wsraw.text, st.text(max_size=50), st.booleans()),
        st.binary(max_size=64),
    ),
    max_size=8,
)


def test_random_frames_after_handshake(gserver, errors):
    app = SecurityApp(ws_config=CFG)
    srv = gserver(app, header_timeout=1.0)

    @FUZZ
    @given(FRAMES, st.booleans())
    def check(frames, send_close):
        before = len(app.ws_closes)
        sock, status, _, rest = wsraw.handshake(srv.port, "/ws",
                                                headers={"Sec-WebSocket-Extensions": "permessage-deflate"})
        assert status == 101
        try:
            for f in frames:
                sock.sendall(f)
            if send_close:
                sock.sendall(wsraw.close_frame(1000))
            sock.shutdown(socket.SHUT_WR)  # and then EOF: the server must wind up
        except OSError:
            pass
        reader = wsraw.Reader(sock, rest)
        code = None
        with gevent.Timeout(5):
            while True:
                f = reader.next(timeout=5)
                if f is None:
                    break
                if f[0] == 0x8:
                    code = struct.unpack("!H", f[1][:2])[0] if len(f[1]) >= 2 else 1005
        sock.close()
        assert code is None or code in VALID_SENT or code == 1005, code
        assert wait_until(lambda: len(app.ws_closes) > before, 3)
        assert app.ws_closes[-1] in VALID_SENT | {1005, 1006}, app.ws_closes[-1]

    with LeakCheck(extra={"websockets": lambda: len(open_connections()),
                          "connections": lambda: srv.connections}):
        check()
        with connect(f"ws://127.0.0.1:{srv.port}/ws", open_timeout=2) as c:
            c.send("still healthy")
            assert c.recv(timeout=2) == "still healthy"
    assert not errors.unexpected()


HEADER_VALUES = st.one_of(
    st.sampled_from(["websocket", "WebSocket", "websocket, h2c", "Upgrade", "keep-alive, Upgrade",
                     "13", "8", "13, 8", "", " ", "dGhlIHNhbXBsZSBub25jZQ==", "short", "null",
                     "http://127.0.0.1", "https://evil.example", "permessage-deflate",
                     "permessage-deflate; client_max_window_bits=8; server_max_window_bits=99",
                     "permessage-deflate; x=1, permessage-deflate", "chat, superchat"]),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
)
HEADER_NAMES = st.sampled_from(["Upgrade", "Connection", "Sec-WebSocket-Version",
                                "Sec-WebSocket-Key", "Origin", "Sec-WebSocket-Extensions",
                                "Sec-WebSocket-Protocol", "Host", "Content-Length"])
REQUESTS = st.tuples(st.sampled_from(["GET", "GET", "POST", "HEAD", "OPTIONS"]),
                     st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0"]),
                     st.dictionaries(HEADER_NAMES, HEADER_VALUES, max_size=9))
VALID_STATUS = {101, 400, 403, 405, 426, 501, 503, 505}


def test_random_upgrade_requests(gserver, errors):
    app = SecurityApp(ws_config=CFG)
    srv = gserver(app, header_timeout=1.0)

    @FUZZ
    @given(REQUESTS)
    def check(req):
        method, version, headers = req
        head = f"{method} /ws {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        try:
            s.sendall(head.encode() + b"\r\n")
            status, _, _ = read_response_head(s)
        except (ConnectionResetError, BrokenPipeError):
            status = 0
        finally:
            s.close()
        assert status in VALID_STATUS or status == 0, (status, req)

    with LeakCheck(extra={"websockets": lambda: len(open_connections()),
                          "connections": lambda: srv.connections}):
        check()
        assert wait_until(lambda: len(open_connections()) == 0, 3)
    assert not errors.unexpected()
