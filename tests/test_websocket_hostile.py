"""Hostile input over raw sockets: each gets the RFC close code (or HTTP
status), and the server keeps serving a well-behaved client meanwhile."""

from __future__ import annotations

import socket
import struct
import time
import tracemalloc
import zlib
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.sync.client import connect

import gstream
from gstream import WSConfig, websocket_app
from gstream.handler import GStreamHandler
from tests import wsraw
from tests.helpers import read_response_head, wait_until

LIMIT = 64 * 1024


def echo(ws: gstream.WebSocket) -> None:
    for m in ws:
        ws.send(m)


class FastHeadHandler(GStreamHandler):
    request_head_timeout = 0.3


@pytest.fixture
def port(serve: Any) -> Iterator[int]:
    """An echo server with a 64 KiB read limit; after the test a well-behaved
    client must still get its echo."""
    srv = serve(websocket_app(echo, WSConfig(read_limit=LIMIT, close_timeout=0.5,
                                             compression=True)),
                handler_class=FastHeadHandler)
    yield srv.port
    with connect(f"ws://127.0.0.1:{srv.port}/", open_timeout=2) as c:
        c.send("still healthy")
        assert c.recv(timeout=2) == "still healthy"


def expect_close(port: int, payload: bytes, code: int, headers: dict[str, str] | None = None,
                 ) -> None:
    sock, status, _, rest = wsraw.handshake(port, headers=headers)
    assert status == 101
    sock.sendall(payload)
    r = wsraw.Reader(sock, rest)
    got, _ = r.until_close(timeout=3)
    assert got == code
    assert r.at_eof(timeout=3)  # and the server drops TCP
    sock.close()


BAD_FRAMES = {
    "unmasked": (wsraw.frame(0x1, b"hi", mask=False), 1002),
    "rsv1_without_extension": (wsraw.frame(0x1, b"hi", rsv=4), 1002),
    "rsv2": (wsraw.frame(0x1, b"hi", rsv=2), 1002),
    "rsv3": (wsraw.frame(0x1, b"hi", rsv=1), 1002),
    "opcode_3": (wsraw.frame(0x3, b"x"), 1002),
    "opcode_0xB": (wsraw.frame(0xB, b"x"), 1002),
    "fragmented_ping": (wsraw.frame(0x9, b"x", fin=False), 1002),
    "ping_126_bytes": (wsraw.frame(0x9, b"p" * 126), 1002),
    "bare_continuation": (wsraw.frame(0x0, b"x"), 1002),
    "text_inside_fragmented": (wsraw.text("a", fin=False) + wsraw.text("b"), 1002),
    "invalid_utf8": (wsraw.text(b"\xff\xfe"), 1007),
    "invalid_utf8_across_fragments": (
        wsraw.text(b"ok \xe2\x82", fin=False) + wsraw.frame(0x0, b"\x28"), 1007),
    "truncated_utf8_at_end": (wsraw.text(b"abc\xe2\x82"), 1007),
    "oversized_message": (wsraw.text(b"x" * (LIMIT + 1)), 1009),
    "oversized_fragmented": (
        wsraw.text(b"x" * 40000, fin=False) + wsraw.frame(0x0, b"x" * 40000), 1009),
    "length_2_63": (b"\x81\xff" + struct.pack("!Q", 1 << 63) + b"abcd", 1009),
    "length_2_64_minus_1": (b"\x81\xff" + b"\xff" * 8 + b"abcd", 1009),
    "close_code_999": (wsraw.close_frame(999), 1002),
    "close_code_1005": (wsraw.close_frame(1005), 1002),
    "close_code_1006": (wsraw.close_frame(1006), 1002),
    "close_code_5000": (wsraw.close_frame(5000), 1002),
    "close_1_byte": (wsraw.frame(0x8, b"\x03"), 1002),
    "close_bad_utf8_reason": (wsraw.close_frame(1000, b"\xff"), 1007),
    "garbage_after_handshake": (b"GET / HTTP/1.1\r\n\r\n", 1002),
}


@pytest.mark.parametrize("name", list(BAD_FRAMES))
def test_bad_frames_get_rfc_close_codes(port: int, name: str) -> None:
    payload, code = BAD_FRAMES[name]
    expect_close(port, payload, code)


def test_valid_utf8_split_inside_a_character_is_fine(port: int) -> None:
    sock, status, _, rest = wsraw.handshake(port)
    euro = "€".encode()
    sock.sendall(wsraw.text(b"a" + euro[:1], fin=False) + wsraw.frame(0x0, euro[1:2], fin=False)
                 + wsraw.frame(0x0, euro[2:] + b"z"))
    assert wsraw.Reader(sock, rest).next() == (0x1, "a€z".encode(), True)
    sock.close()


def test_ping_flood_then_text(port: int) -> None:
    sock, _, _, rest = wsraw.handshake(port)
    sock.sendall(wsraw.frame(0x9, b"") * 5000 + wsraw.text("done"))
    r = wsraw.Reader(sock, rest)
    pongs = 0
    while True:
        op, payload, _ = r.next()  # type: ignore[misc]
        if op == 0xA:
            pongs += 1
            continue
        assert (op, payload) == (0x1, b"done")
        break
    assert pongs == 5000
    sock.close()


def test_compression_bomb_is_never_inflated_in_full(port: int) -> None:
    comp = zlib.compressobj(wbits=-15)
    body = comp.compress(b"\0" * (16 << 20)) + comp.flush(zlib.Z_SYNC_FLUSH)
    assert body.endswith(b"\x00\x00\xff\xff")
    body = body[:-4]
    assert len(body) < 32 * 1024  # a small frame that inflates to 16 MiB
    hdr = {"Sec-WebSocket-Extensions": "permessage-deflate"}
    tracemalloc.start()
    try:
        expect_close(port, wsraw.frame(0x1, body, rsv=4), 1009, headers=hdr)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"peak {peak} bytes: the bomb was inflated"


def test_garbage_before_handshake_gets_400(port: int) -> None:
    s = socket.create_connection(("127.0.0.1", port), timeout=3)
    s.sendall(b"\x16\x03\x01\x00garbage\r\n\r\n")
    status, _, _ = read_response_head(s)
    assert status == 400
    s.close()


def test_handshake_that_never_completes_is_bounded(port: int) -> None:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")  # and then nothing
    t0 = time.monotonic()
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    assert time.monotonic() - t0 < 2.0
    assert data.startswith(b"HTTP/1.1 408")
    s.close()


def test_silent_connection_is_bounded(port: int) -> None:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    t0 = time.monotonic()
    assert s.recv(4096) == b""  # closed without a word: no request line at all
    assert time.monotonic() - t0 < 2.0
    s.close()


def test_abrupt_disconnect_mid_message(serve: Any) -> None:
    seen: list[Any] = []

    def handler(ws: gstream.WebSocket) -> None:
        try:
            ws.receive()
        except gstream.Closed as exc:
            seen.append(exc.code)

    srv = serve(websocket_app(handler))
    sock, _, _, _ = wsraw.handshake(srv.port)
    sock.sendall(wsraw.text("half", fin=False))
    sock.close()
    assert wait_until(lambda: seen == [1006], 3)
