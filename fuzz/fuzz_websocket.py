"""atheris fuzz target for gstream's WebSocket entry points.

Run (not in CI): ``bash fuzz/run.sh websocket 60`` (installs atheris).

Each input is split in two:

* a handshake part: header values for an upgrade request, run through
  :func:`gstream.upgrade` (which must only ever raise ``HandshakeError``) and
  through the ``Request`` gstream builds for websockets' ``ServerProtocol``
  (whose ``accept`` must answer, never raise);
* a frame part: raw bytes sent by a peer to a live :class:`gstream.WebSocket`
  (over a socketpair, after a valid handshake, with permessage-deflate), then
  EOF. The connection must finish within a bound, with a close code a server
  may use (or 1005/1006), and without logging an internal error.
"""

import logging
import socket
import sys

import atheris

with atheris.instrument_imports():
    import gevent
    import gevent.socket
    from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
    from websockets.server import ServerProtocol

    from gstream.errors import HandshakeError
    from gstream.hijack import Hijack
    from gstream.websocket import WebSocket, WSConfig
    from gstream.websocket.upgrade import _request, upgrade

CFG = WSConfig(read_limit=4096, close_timeout=0.05, read_idle_timeout=None, compression=True)
VALID = set(range(1000, 1004)) | set(range(1005, 1012)) | set(range(3000, 5000))
REQUEST = (b"GET /ws HTTP/1.1\r\nHost: fuzz\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
           b"Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n")
HEADERS = ["HTTP_UPGRADE", "HTTP_CONNECTION", "HTTP_SEC_WEBSOCKET_VERSION", "HTTP_SEC_WEBSOCKET_KEY",
           "HTTP_ORIGIN", "HTTP_HOST", "HTTP_SEC_WEBSOCKET_EXTENSIONS", "HTTP_SEC_WEBSOCKET_PROTOCOL"]


class _Internal(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            raise AssertionError(f"internal error logged: {record.getMessage()}") from record.exc_info[1]


logging.getLogger("gstream").addHandler(_Internal(logging.ERROR))


def fuzz_handshake(fdp: "atheris.FuzzedDataProvider") -> None:
    environ = {"REQUEST_METHOD": fdp.PickValueInList(["GET", "POST", "HEAD"]),
               "PATH_INFO": "/ws", "QUERY_STRING": "", "SERVER_PROTOCOL": "HTTP/1.1",
               "wsgi.url_scheme": "http", "SERVER_NAME": "fuzz"}
    for name in HEADERS:
        if fdp.ConsumeBool():
            environ[name] = fdp.ConsumeUnicodeNoSurrogates(48)
    try:
        upgrade(environ, None, CFG)  # no hijackable server here: at best 501
        raise AssertionError("upgrade succeeded without a server")
    except HandshakeError as exc:
        assert 400 <= exc.status < 600
    try:
        request = _request(environ)
    except HandshakeError as exc:
        assert exc.status == 400  # a header value websockets will not hold
        return
    protocol = ServerProtocol(extensions=[ServerPerMessageDeflateFactory()], max_size=4096)
    protocol.accept(request)  # must return a response, never raise


def fuzz_frames(data: bytes) -> None:
    a, b = gevent.socket.socketpair()
    protocol = ServerProtocol(extensions=[ServerPerMessageDeflateFactory(
        server_max_window_bits=12, compress_settings={"memLevel": 5})], max_size=CFG.read_limit)
    protocol.receive_data(REQUEST)
    request = protocol.events_received()[0]
    protocol.send_response(protocol.accept(request))  # type: ignore[arg-type]
    protocol.data_to_send()  # the 101 is not needed here
    ws = WebSocket(protocol, Hijack(sock=a, pre_read=b"", server="fuzz"), CFG, {})
    ws._start(b"")
    try:
        b.sendall(data)
        b.shutdown(socket.SHUT_WR)
    except OSError:
        pass

    def drain() -> None:
        try:
            while b.recv(65536):
                pass
        except OSError:
            pass

    def consume() -> None:
        # As an application would: with nobody reading, more than max_queue
        # messages pause reading (backpressure) and the EOF is never seen.
        for _ in ws:
            pass

    reader = gevent.spawn(drain)
    consumer = gevent.spawn(consume)
    assert ws.wait_closed(5), "connection did not finish within 5 s"
    assert ws.close_code in VALID, ws.close_code
    reader.kill()
    consumer.kill()
    a.close()
    b.close()


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    if fdp.ConsumeBool():
        fuzz_handshake(fdp)
    else:
        fuzz_frames(fdp.ConsumeBytes(fdp.remaining_bytes()))


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
