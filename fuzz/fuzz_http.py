"""atheris fuzz target for gstream's HTTP/1.1 request-head rules (gstream.httpcheck).

Run (not in CI): ``bash fuzz/run.sh http 60`` (installs atheris).

Each input is a request head, cut into lines the way pywsgi's reader hands
them out (each with its LF). The rules must only ever raise
``InvalidRequest``, with a status gstream uses; and a head they accept must
mean the same to :mod:`http.client` (which pywsgi parses it with): one Host
(or none on HTTP/1.0), the same Content-Length, chunked exactly when the
rules say so. That is the request-smuggling property: one reading.
"""

import http.client
import io
import sys

import atheris

with atheris.instrument_imports():
    from gstream import httpcheck
    from gstream.errors import InvalidRequest

STATUSES = {400, 431, 501, 505}


def head_lines(rest: bytes) -> list[bytes]:
    """The lines a reader hands out after the request line, up to the empty one or EOF."""
    lines = []
    pos = 0
    while True:
        nl = rest.find(b"\n", pos)
        line = rest[pos:] if nl < 0 else rest[pos:nl + 1]
        lines.append(line)
        if nl < 0 or line in (b"\r\n", b"\n"):
            return lines
        pos = nl + 1


def test_one_input(data: bytes) -> None:
    request_line, _, rest = data.partition(b"\n")
    lines = head_lines(rest)
    try:
        line = httpcheck.check_request_line(request_line + b"\n")
        framing = httpcheck.check_headers(lines, line.version)
    except InvalidRequest as exc:
        assert exc.status in STATUSES, exc
        return
    msg = http.client.parse_headers(io.BytesIO(b"".join(lines)))
    hosts = msg.get_all("Host") or []
    assert len(hosts) == (1 if line.version >= (1, 1) else len(hosts)) and len(hosts) <= 1, hosts
    length = msg.get("Content-Length")
    assert (None if length is None else int(length)) == framing.content_length, (length, framing)
    te = msg.get("Transfer-Encoding", "")
    assert (te.strip().lower() == "chunked") == framing.chunked, (te, framing)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
