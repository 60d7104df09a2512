"""Load generator worker: one process, one epoll loop, raw non-blocking sockets.

The runner starts several of these (``python bench/loadgen.py '<json config>'``)
and drives them with one JSON command per line on stdin; each command gets one
JSON reply line on stdout. Keeping the clients this bare (no asyncio, no
greenlets, regex parsing of whole recv() batches) is what lets a couple of
processes out-run the raw epoll server, which the runner checks by reporting
this process's CPU.

Commands:
  {"cmd": "connect", "kind": "sse"|"ws"|"echo"|"view", "n": N, "timeout": s}
  {"cmd": "arm", "run": R, "k": K}          start tracking run R (K events)
  {"cmd": "collect", "timeout": s}          wait until every stream got K events
  {"cmd": "idle", "seconds": s}             service streams, count bytes
  {"cmd": "echo", "seconds": s}             closed-loop echo round trips
  {"cmd": "view", "seconds": s}             closed-loop GET /view
  {"cmd": "stats"} / {"cmd": "quit"}
"""

from __future__ import annotations

import base64
import json
import os
import re
import select
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import raise_nofile  # noqa: E402

IP_BIND_ADDRESS_NO_PORT = 24
DATA_RE = re.compile(rb"^data: ?(\d+) (\d+) (\d+) ", re.M)
# A complete unfragmented text frame of < 126 bytes whose payload starts with
# "run seq ts ": what a fan-out burst is made of (payload filler is "x", so
# the 0x81 byte cannot occur inside one).
WS_DATA_RE = re.compile(rb"\x81[\x00-\x7d](\d+) (\d+) (\d+) ")
EV_IN = select.EPOLLIN | select.EPOLLRDHUP
EV_OUT = select.EPOLLOUT | select.EPOLLIN | select.EPOLLRDHUP
MAX_INFLIGHT = 200
# A connect phase ends early when fewer than 1% of its connections ended
# (opened or failed) in the last CONNECT_STALL_SECS: a server that stopped
# accepting (Flask-Sock out of descriptors near 10,000 connections retries
# accept() about once a second) will not take the rest, and waiting out the
# whole deadline cost ~45 s per run.
CONNECT_STALL_SECS = 5.0
CONNECT_STALL_SHARE = 0.01
# It also ends once more than this share of its connections failed: the
# harness wants 99% of a size, so the size has failed already (Flask-Sock
# answering 500s near 10,000 connections kept a phase busy for 45 s).
CONNECT_FAIL_SHARE = 0.02

CONNECTING, HEAD, OPEN, DEAD = 0, 1, 2, 3


class Client:
    __slots__ = (
        "sock", "fd", "kind", "state", "raw", "buf", "chunked", "chunk_left", "out",
        "got", "next_seq", "ooo", "dup", "frame", "payload", "expect", "sent_at", "busy", "clen",
    )

    def __init__(self, sock: socket.socket, kind: str) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.kind = kind
        self.state = CONNECTING
        self.raw = b""
        self.buf = b""
        self.chunked = False
        self.chunk_left = 0
        self.out = b""
        self.got = 0
        self.next_seq = 0
        self.ooo = 0
        self.dup = 0
        self.frame = b""
        self.payload = b""
        self.expect = b""
        self.sent_at = 0
        self.busy = False
        self.clen = -1


def dechunk(c: Client, data: bytes) -> bytes:
    """Strip HTTP/1.1 chunk framing incrementally (state kept on the client)."""
    raw = c.raw + data if c.raw else data
    pos = 0
    out = []
    n = len(raw)
    while pos < n:
        if c.chunk_left > 0:
            take = min(c.chunk_left, n - pos)
            out.append(raw[pos : pos + take])
            pos += take
            c.chunk_left -= take
            if c.chunk_left:
                break
            c.chunk_left = -2
        if c.chunk_left == -2:
            if n - pos < 2:
                break
            pos += 2
            c.chunk_left = 0
        nl = raw.find(b"\r\n", pos)
        if nl < 0:
            break
        size = int(raw[pos:nl].split(b";")[0] or b"0", 16)
        pos = nl + 2
        if size == 0:
            c.chunk_left = -3  # end of body
            break
        c.chunk_left = size
    c.raw = raw[pos:]
    return b"".join(out)


class Worker:
    def __init__(self, cfg: dict) -> None:
        self.host = cfg["host"]
        self.port = cfg["port"]
        self.srcs = cfg.get("src_addrs") or [None]
        self.src_i = 0
        self.ep = select.epoll()
        self.clients: dict[int, Client] = {}
        self.pending: list[str] = []
        self.inflight = 0
        self.connects_done = 0  # attempts that ended (open or failed): progress
        self.failed = 0
        self.closed_by_peer = 0
        self.errors: dict[str, int] = {}
        self.waiter: dict | None = None
        self.stdin_buf = b""
        self.bytes_in = 0
        # fan-out tracking
        self.run = -1
        self.k = 0
        self.maxrecv: list[int] = []
        self.pubts: list[int] = []
        # echo / view
        self.samples: list[int] = []
        self.measuring = False
        self.deadline = 0.0
        self.ep.register(0, select.EPOLLIN)

    # ---- plumbing -------------------------------------------------------------
    def reply(self, obj: dict) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    def err(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1

    def kill(self, c: Client, why: str | None = None) -> None:
        if c.state == DEAD:
            return
        if c.state in (CONNECTING, HEAD):
            self.inflight -= 1
            self.connects_done += 1
            self.failed += 1
        elif why:
            self.closed_by_peer += 1
        if why:
            self.err(why)
        c.state = DEAD
        self.clients.pop(c.fd, None)
        try:
            self.ep.unregister(c.fd)
        except OSError:
            pass
        c.sock.close()

    def send(self, c: Client, data: bytes) -> None:
        if c.out:
            c.out += data
            return
        try:
            n = c.sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError:
            self.kill(c, "send-error")
            return
        if n < len(data):
            c.out = data[n:]
            self.ep.modify(c.fd, EV_OUT)

    def open_one(self, kind: str) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        src = self.srcs[self.src_i % len(self.srcs)]
        self.src_i += 1
        if src:
            try:
                s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            except OSError:
                pass
            s.bind((src, 0))
        s.connect_ex((self.host, self.port))
        c = Client(s, kind)
        self.clients[c.fd] = c
        self.inflight += 1
        self.ep.register(c.fd, EV_OUT)

    def request_for(self, c: Client) -> bytes:
        host = f"Host: {self.host}:{self.port}\r\n"
        if c.kind == "sse":
            return f"GET /sse?buffer=1024 HTTP/1.1\r\n{host}Accept: text/event-stream\r\n\r\n".encode()
        path = "/ws" if c.kind == "ws" else "/echo"
        key = base64.b64encode(os.urandom(16)).decode()
        return (
            f"GET {path} HTTP/1.1\r\n{host}Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()

    # ---- per-event handlers ---------------------------------------------------
    def on_connected(self, c: Client) -> None:
        errno_ = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if errno_:
            self.kill(c, f"connect-errno-{errno_}")
            return
        self.ep.modify(c.fd, EV_IN)
        if c.kind == "view":
            c.state = OPEN
            self.inflight -= 1
            self.connects_done += 1
            return
        c.state = HEAD
        self.send(c, self.request_for(c))

    def on_head(self, c: Client, data: bytes, t: int) -> None:
        c.raw += data
        end = c.raw.find(b"\r\n\r\n")
        if end < 0:
            if len(c.raw) > 65536:
                self.kill(c, "head-too-long")
            return
        head = c.raw[:end].decode("latin-1")
        rest = c.raw[end + 4 :]
        c.raw = b""
        status = head.split(" ", 2)[1] if " " in head else ""
        want = "200" if c.kind == "sse" else "101"
        if status != want:
            self.kill(c, f"status-{status or 'none'}")
            return
        c.chunked = "transfer-encoding: chunked" in head.lower()
        c.state = OPEN
        self.inflight -= 1
        self.connects_done += 1
        if c.kind == "echo":
            mask = os.urandom(4)
            c.payload = os.urandom(50).hex().encode()  # 100 bytes
            masked = bytes(b ^ mask[i & 3] for i, b in enumerate(c.payload))
            c.frame = bytes((0x81, 0x80 | len(c.payload))) + mask + masked
            c.expect = bytes((0x81, len(c.payload))) + c.payload  # the echo, unmasked
        if rest:
            self.on_data(c, rest, t)

    def on_data(self, c: Client, data: bytes, t: int) -> None:
        self.bytes_in += len(data)
        if c.kind == "echo" and not c.buf and data == c.expect:
            # The whole expected echo in one read (the usual case, whatever
            # the server): one comparison instead of the frame parser, so
            # the load generator leaves more of the 2 cores to the server.
            self.on_echo(c, c.payload, t)
            return
        if c.kind == "sse":
            body = dechunk(c, data) if c.chunked else data
            if c.chunk_left == -3:
                self.kill(c, "stream-ended")
                return
            buf = c.buf + body if c.buf else body
            end = buf.rfind(b"\n")
            if end < 0:
                c.buf = buf
                return
            c.buf = buf[end + 1 :]
            if self.run >= 0:
                for run, seq, ts in DATA_RE.findall(buf, 0, end + 1):
                    self.record(c, int(run), int(seq), int(ts), t)
        elif c.kind == "view":
            self.on_view(c, data, t)
        else:
            self.on_ws(c, data, t)

    def record(self, c: Client, run: int, seq: int, ts: int, t: int) -> None:
        if run != self.run or seq >= self.k:
            return
        if seq < c.next_seq:
            c.dup += 1
            return
        if seq > c.next_seq:
            c.ooo += 1
        c.next_seq = seq + 1
        c.got += 1
        if t > self.maxrecv[seq]:
            self.maxrecv[seq] = t
        self.pubts[seq] = ts

    def on_ws(self, c: Client, data: bytes, t: int) -> None:
        buf = c.buf + data if c.buf else data
        pos = 0
        n = len(buf)
        if c.kind != "echo" and self.run >= 0:
            pos = self.ws_fast(c, buf, t)
        while n - pos >= 2:
            b0 = buf[pos]
            ln = buf[pos + 1] & 0x7F
            hl = 2
            if ln == 126:
                if n - pos < 4:
                    break
                ln = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                hl = 4
            elif ln == 127:
                if n - pos < 10:
                    break
                ln = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                hl = 10
            if n - pos < hl + ln:
                break
            payload = buf[pos + hl : pos + hl + ln]
            pos += hl + ln
            op = b0 & 0x0F
            if op == 1 or op == 2:
                if c.kind == "echo":
                    self.on_echo(c, payload, t)
                elif self.run >= 0:
                    parts = payload.split(b" ", 3)
                    if len(parts) == 4:
                        self.record(c, int(parts[0]), int(parts[1]), int(parts[2]), t)
            elif op == 9:  # ping: pong with an all-zero mask (payload unchanged)
                self.send(c, bytes((0x8A, 0x80 | len(payload))) + b"\0\0\0\0" + payload)
            elif op == 8:
                self.send(c, b"\x88\x82\0\0\0\0" + (payload[:2] or b"\x03\xe8"))
                self.kill(c, "ws-closed-by-server")
                return
        c.buf = buf[pos:]

    def ws_fast(self, c: Client, buf: bytes, t: int) -> int:
        """Record a run of small text frames with one regex pass (as SSE does).

        Walks the frame headers first; the regex result is used only when it
        found exactly one record per frame, else the per-frame parser below
        handles everything. Returns how far the buffer was consumed.
        """
        pos = 0
        n = len(buf)
        frames = 0
        while pos + 2 <= n and buf[pos] == 0x81:
            end = pos + 2 + buf[pos + 1]
            if buf[pos + 1] > 125 or end > n:
                break
            frames += 1
            pos = end
        if not frames:
            return 0
        found = WS_DATA_RE.findall(buf, 0, pos)
        if len(found) != frames:
            return 0
        for run, seq, ts in found:
            self.record(c, int(run), int(seq), int(ts), t)
        return pos

    def on_echo(self, c: Client, payload: bytes, t: int) -> None:
        if not c.busy:
            self.err("echo-unexpected")
            return
        c.busy = False
        if payload != c.payload:
            self.err("echo-mismatch")
        if self.measuring:
            self.samples.append((t - c.sent_at) // 1000)
            if time.monotonic() < self.deadline:
                c.sent_at = time.monotonic_ns()
                c.busy = True
                self.send(c, c.frame)

    def on_view(self, c: Client, data: bytes, t: int) -> None:
        if c.clen < 0:
            c.raw += data
            end = c.raw.find(b"\r\n\r\n")
            if end < 0:
                return
            head = c.raw[:end].decode("latin-1").lower()
            body = c.raw[end + 4 :]
            c.raw = b""
            if not head.startswith("http/1.1 200"):
                self.err("view-status-" + head[9:12])
            m = re.search(r"content-length:\s*(\d+)", head)
            c.chunked = m is None
            c.clen = int(m.group(1)) if m else 0
            c.chunk_left = 0
            data = body
        if c.chunked:
            dechunk(c, data)
            done = c.chunk_left == -3
        else:
            c.clen -= len(data)
            done = c.clen <= 0
        if done:
            c.clen = -1
            c.busy = False
            if self.measuring:
                self.samples.append((t - c.sent_at) // 1000)
                if time.monotonic() < self.deadline:
                    self.start_view(c)

    def start_view(self, c: Client) -> None:
        c.busy = True
        c.clen = -1
        c.sent_at = time.monotonic_ns()
        self.send(c, f"GET /view HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())

    # ---- commands -------------------------------------------------------------
    def open_of(self, kind: str) -> int:
        return sum(1 for c in self.clients.values() if c.kind == kind and c.state == OPEN)

    def command(self, cmd: dict) -> None:
        name = cmd["cmd"]
        now = time.monotonic()
        if name == "connect":
            self.failed = 0
            self.pending.extend([cmd["kind"]] * int(cmd["n"]))
            self.waiter = {"cmd": "connect", "deadline": now + cmd.get("timeout", 60),
                           "kind": cmd["kind"], "t0": now, "done": self.connects_done,
                           "window_at": now,
                           "min_progress": max(1, int(int(cmd["n"]) * CONNECT_STALL_SHARE)),
                           "max_failed": int(int(cmd["n"]) * CONNECT_FAIL_SHARE)}
        elif name == "arm":
            self.run = int(cmd["run"])
            self.k = int(cmd["k"])
            self.maxrecv = [0] * self.k
            self.pubts = [0] * self.k
            for c in self.clients.values():
                c.got = c.next_seq = c.ooo = c.dup = 0
            self.reply({"armed": self.run})
        elif name == "collect":
            self.waiter = {"cmd": "collect", "deadline": now + cmd.get("timeout", 30)}
        elif name == "idle":
            self.bytes_in = 0
            self.closed_by_peer = 0
            self.waiter = {"cmd": "idle", "deadline": now + cmd["seconds"]}
        elif name in ("echo", "view"):
            self.samples = []
            self.measuring = True
            self.deadline = now + cmd["seconds"]
            for c in self.clients.values():
                if c.kind == name and c.state == OPEN and not c.busy:
                    if name == "echo":
                        c.sent_at = time.monotonic_ns()
                        c.busy = True
                        self.send(c, c.frame)
                    else:
                        self.start_view(c)
            self.waiter = {"cmd": name, "deadline": self.deadline, "drain": self.deadline + 2}
        elif name == "stats":
            self.reply(self.stats())
        elif name == "quit":
            self.reply({"bye": True})
            sys.exit(0)

    def stats(self) -> dict:
        kinds: dict[str, int] = {}
        for c in self.clients.values():
            if c.state == OPEN:
                kinds[c.kind] = kinds.get(c.kind, 0) + 1
        return {"open": kinds, "errors": self.errors, "closed_by_peer": self.closed_by_peer}

    def check_waiter(self) -> None:
        w = self.waiter
        if w is None:
            return
        now = time.monotonic()
        name = w["cmd"]
        if name == "connect":
            stalled = False
            if now - w["window_at"] >= CONNECT_STALL_SECS:
                stalled = self.connects_done - w["done"] < w["min_progress"]
                w["done"], w["window_at"] = self.connects_done, now
            hopeless = self.failed > w["max_failed"]
            if ((not self.pending and self.inflight == 0) or now >= w["deadline"] or stalled
                    or hopeless):
                if stalled:
                    self.err("connect-stalled")
                if hopeless:
                    self.err("connect-gave-up")
                self.pending.clear()
                self.reply({"connected": self.open_of(w["kind"]), "failed": self.failed,
                            "inflight": self.inflight, "secs": now - w["t0"],
                            "errors": self.errors})
                self.waiter = None
        elif name == "collect":
            streams = [c for c in self.clients.values()
                       if c.state == OPEN and c.kind in ("sse", "ws")]
            complete = sum(1 for c in streams if c.got >= self.k)
            if complete == len(streams) or now >= w["deadline"]:
                self.reply({
                    "clients": len(streams), "complete": complete,
                    "deliveries": sum(c.got for c in streams),
                    "lost": sum(max(0, self.k - c.got) for c in streams),
                    "ooo": sum(c.ooo for c in streams), "dup": sum(c.dup for c in streams),
                    "maxrecv": self.maxrecv, "pubts": self.pubts, "errors": self.errors,
                    "closed_by_peer": self.closed_by_peer,
                })
                self.waiter = None
                self.run = -1
        elif name == "idle":
            if now >= w["deadline"]:
                self.reply({"bytes": self.bytes_in, "closed_by_peer": self.closed_by_peer,
                            **self.stats()})
                self.waiter = None
        elif name in ("echo", "view"):
            if now < w["deadline"]:
                return
            self.measuring = False
            busy = any(c.busy for c in self.clients.values() if c.kind == name)
            if not busy or now >= w["drain"]:
                self.reply({"samples_us": self.samples, "errors": self.errors,
                            "open": self.open_of(name), "still_busy": busy})
                self.waiter = None

    # ---- the loop -------------------------------------------------------------
    def on_stdin(self) -> None:
        data = os.read(0, 65536)
        if not data:
            sys.exit(0)
        self.stdin_buf += data
        while b"\n" in self.stdin_buf:
            line, self.stdin_buf = self.stdin_buf.split(b"\n", 1)
            if line.strip():
                self.command(json.loads(line))

    def loop(self) -> None:
        clients = self.clients
        while True:
            while self.pending and self.inflight < MAX_INFLIGHT:
                try:
                    self.open_one(self.pending.pop())
                except OSError as exc:
                    self.failed += 1
                    self.err(f"open-{exc.errno}")
            timeout = 0.05 if self.waiter else 1.0
            for fd, ev in self.ep.poll(timeout):
                if fd == 0:
                    self.on_stdin()
                    continue
                c = clients.get(fd)
                if c is None:
                    continue
                if c.state == CONNECTING:
                    if ev & (select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP):
                        self.on_connected(c)
                    continue
                if ev & select.EPOLLOUT and c.out:
                    data, c.out = c.out, b""
                    self.ep.modify(c.fd, EV_IN)
                    self.send(c, data)
                if ev & (select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR):
                    try:
                        data = c.sock.recv(262144)
                    except BlockingIOError:
                        continue
                    except OSError:
                        self.kill(c, "recv-error")
                        continue
                    if not data:
                        self.kill(c, "eof")
                        continue
                    t = time.monotonic_ns()
                    if c.state == HEAD:
                        self.on_head(c, data, t)
                    else:
                        self.on_data(c, data, t)
            self.check_waiter()


def main() -> None:
    raise_nofile()
    cfg = json.loads(sys.argv[1])
    Worker(cfg).loop()


if __name__ == "__main__":
    main()
