"""The limit: a minimal single-threaded epoll loop writing pre-encoded frames.

No framework, no greenlets: one dict of connections, frames encoded once per
event and handed to ``send`` for every subscriber, leftovers buffered until
EPOLLOUT. It speaks just enough HTTP/1.1 and RFC 6455 for the benchmark
(SSE without chunking, unfragmented client frames). One heartbeat pass over
all streams per interval, never a timer per connection.
"""

from __future__ import annotations

import select
import socket
import time
from urllib.parse import urlsplit

from _base import listen
from common import (
    announce_ready,
    make_payload,
    parse_publish_query,
    server_args,
    sse_frame,
    view_body,
    ws_accept,
    ws_frame,
)

IN = select.EPOLLIN | select.EPOLLRDHUP
INOUT = IN | select.EPOLLOUT
MAX_OUT = 8 << 20  # a subscriber this far behind is cut off
MAX_HEAD = 16 << 10

SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Connection: close\r\n\r\n: open\n\n"
)
SSE_HB = b": hb\n\n"
WS_PING = b"\x89\x00"


class Conn:
    __slots__ = ("sock", "fd", "inbuf", "out", "kind", "close_after")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.inbuf = b""
        self.out: list[bytes] = []
        self.kind = "http"
        self.close_after = False


args = server_args()
lsock = listen(args.host, args.port)
lsock.setblocking(False)
ep = select.epoll()
ep.register(lsock.fileno(), select.EPOLLIN)
conns: dict[int, Conn] = {}
subs: dict[str, dict[int, Conn]] = {"sse": {}, "ws": {}}
jobs: list[dict] = []


def close(c: Conn) -> None:
    if conns.pop(c.fd, None) is None:
        return
    subs["sse"].pop(c.fd, None)
    subs["ws"].pop(c.fd, None)
    try:
        ep.unregister(c.fd)
    except OSError:
        pass
    c.sock.close()


def write(c: Conn, data: bytes) -> None:
    if c.out:
        c.out.append(data)
        if sum(map(len, c.out)) > MAX_OUT:
            close(c)
        return
    try:
        n = c.sock.send(data)
    except BlockingIOError:
        n = 0
    except OSError:
        close(c)
        return
    if n < len(data):
        c.out.append(data[n:])
        ep.modify(c.fd, INOUT)
    elif c.close_after:
        close(c)


def flush(c: Conn) -> None:
    data = b"".join(c.out)
    c.out.clear()
    try:
        n = c.sock.send(data)
    except BlockingIOError:
        n = 0
    except OSError:
        close(c)
        return
    if n < len(data):
        c.out.append(data[n:])
    else:
        ep.modify(c.fd, IN)
        if c.close_after:
            close(c)


def http_response(body: bytes, ctype: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: " + ctype + b"\r\nContent-Length: "
        + str(len(body)).encode() + b"\r\n\r\n" + body
    )


def handle_request(c: Conn) -> None:
    while c.kind == "http":
        end = c.inbuf.find(b"\r\n\r\n")
        if end < 0:
            if len(c.inbuf) > MAX_HEAD:
                close(c)
            return
        head, c.inbuf = c.inbuf[:end].decode("latin-1"), c.inbuf[end + 4 :]
        lines = head.split("\r\n")
        try:
            _method, target, _ = lines[0].split(" ", 2)
        except ValueError:
            close(c)
            return
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        url = urlsplit(target)
        if url.path == "/sse":
            c.kind = "sse"
            subs["sse"][c.fd] = c
            write(c, SSE_HEAD)
        elif url.path in ("/ws", "/echo") and "sec-websocket-key" in headers:
            c.kind = "ws" if url.path == "/ws" else "echo"
            if c.kind == "ws":
                subs["ws"][c.fd] = c
            write(
                c,
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Accept: " + ws_accept(headers["sec-websocket-key"]).encode()
                + b"\r\n\r\n",
            )
            if c.inbuf:
                handle_ws(c)
        elif url.path == "/publish":
            p = parse_publish_query(url.query)
            p["seq"] = 0
            p["due"] = time.monotonic()
            jobs.append(p)
            write(c, http_response(b"ok\n", b"text/plain"))
        elif url.path == "/view":
            write(c, http_response(view_body()))
        else:
            c.close_after = True
            write(c, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            return


def unmask(mask: bytes, data: bytes) -> bytes:
    n = len(data)
    if not n:
        return data
    m = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(m, "little")).to_bytes(n, "little")


def handle_ws(c: Conn) -> None:
    buf = c.inbuf
    pos = 0
    while len(buf) - pos >= 2:
        b0, b1 = buf[pos], buf[pos + 1]
        ln = b1 & 0x7F
        hl = 2
        if ln == 126:
            if len(buf) - pos < 4:
                break
            ln = int.from_bytes(buf[pos + 2 : pos + 4], "big")
            hl = 4
        elif ln == 127:
            if len(buf) - pos < 10:
                break
            ln = int.from_bytes(buf[pos + 2 : pos + 10], "big")
            hl = 10
        masked = b1 & 0x80
        total = hl + (4 if masked else 0) + ln
        if len(buf) - pos < total:
            break
        payload = buf[pos + total - ln : pos + total]
        if masked:
            payload = unmask(buf[pos + hl : pos + hl + 4], payload)
        pos += total
        op = b0 & 0x0F
        if op in (1, 2):
            if c.kind == "echo":
                write(c, ws_frame(payload, op))
        elif op == 8:
            c.close_after = True
            write(c, ws_frame(payload[:2], 8))
            return
        elif op == 9:
            write(c, ws_frame(payload, 0xA))
    c.inbuf = buf[pos:]


def on_readable(c: Conn) -> None:
    try:
        data = c.sock.recv(65536)
    except BlockingIOError:
        return
    except OSError:
        close(c)
        return
    if not data:
        close(c)
        return
    if c.kind == "sse":
        return  # nothing to read on a stream; drained and ignored
    c.inbuf += data
    if c.kind == "http":
        handle_request(c)
    else:
        handle_ws(c)


def publish_due(now: float) -> float:
    """Publish every due event; return seconds until the next one (or 3600)."""
    wait = 3600.0
    for p in list(jobs):
        if p["due"] <= now:
            payload = make_payload(p["run"], p["seq"], p["size"])
            frame = sse_frame(payload) if p["kind"] == "sse" else ws_frame(payload.encode())
            for c in list(subs["sse" if p["kind"] == "sse" else "ws"].values()):
                write(c, frame)
            p["seq"] += 1
            p["due"] = now + p["interval"]
            if p["seq"] >= p["n"]:
                jobs.remove(p)
                continue
        wait = min(wait, p["due"] - now)
    return max(wait, 0.0)


def main() -> None:
    hb = args.heartbeat
    next_hb = time.monotonic() + hb if hb else float("inf")
    announce_ready(lsock.getsockname()[1], kinds=["sse", "ws"], echo=True, legacy="sse")
    lfd = lsock.fileno()
    timeout = 1.0
    while True:
        for fd, ev in ep.poll(timeout):
            if fd == lfd:
                while True:
                    try:
                        s, _ = lsock.accept()
                    except BlockingIOError:
                        break
                    except OSError:
                        break
                    s.setblocking(False)
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    c = Conn(s)
                    conns[c.fd] = c
                    ep.register(c.fd, IN)
                continue
            c = conns.get(fd)
            if c is None:
                continue
            if ev & select.EPOLLOUT and c.out:
                flush(c)
            readable = ev & (select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR)
            if readable and fd in conns:
                on_readable(c)
        now = time.monotonic()
        timeout = publish_due(now) if jobs else 1.0
        if now >= next_hb:
            for c in list(subs["sse"].values()):
                write(c, SSE_HB)
            for c in list(subs["ws"].values()):
                write(c, WS_PING)
            next_hb = now + hb
        timeout = min(timeout, max(0.0, next_hb - now))


main()
