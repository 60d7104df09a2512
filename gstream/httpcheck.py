"""Strict HTTP/1.1 request heads (RFC 9112, RFC 9110): the rules, without I/O.

Pure functions over the raw request line and header lines (bytes, with their
terminators) that raise :class:`~gstream.errors.InvalidRequest` for a request
to refuse; :mod:`gstream.strict` applies them to pywsgi's handlers. Every
rule, its RFC section and its origin (h11, gunicorn) are in docs/security.md.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from http import HTTPStatus
from typing import NamedTuple

from .errors import InvalidRequest

__all__ = ["RequestLine", "Framing", "MAX_FIELDS", "check_request_line", "check_headers",
           "check_fields", "head_too_large", "error_response"]

#: Header lines a request may carry (http.client's limit, which pywsgi applies too).
MAX_FIELDS = 100

# RFC 9110 5.6.2: token = 1*tchar.
_TOKEN = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_TOKEN_RE = re.compile(_TOKEN)
# RFC 9112 3: request-line = method SP request-target SP HTTP-version, with
# exactly one SP between them (the lenient whitespace parsing that 3 allows
# is what request smuggling feeds on). The target is visible ASCII only.
_REQUEST_LINE_RE = re.compile(
    rb"(?P<method>" + _TOKEN + rb") (?P<target>[\x21-\x7e]+) HTTP/(?P<major>[0-9])\.(?P<minor>[0-9])")
# RFC 9112 5 and RFC 9110 5.5, as h11 reads them: field-vchar is any byte but
# NUL and whitespace (so other control characters stay, for robustness: h11
# issue 57, real cookies carry \x01, as RFC 9110 5.5 allows), with SP/HTAB
# between and around. Every byte of OWS field-value OWS is then SP, HTAB or a
# field-vchar, so the same language is "any byte but NUL, CR, LF, VT, FF": one
# negated class, which sre matches several times faster than h11's pattern.
_FIELD_LINE = _TOKEN + rb":[^\x00\r\n\x0b\x0c]*\r?\n"
_FIELD_LINE_RE = re.compile(_FIELD_LINE)
# A whole head (the lines after the request line) in one match: the fast path.
_HEAD_RE = re.compile(rb"(?:" + _FIELD_LINE + rb")*\r?\n")
# The fields the framing rules read, from b"\n" + the lowercased head (a
# literal first byte lets sre skip ahead; ^ with re.M tries every position).
_FRAMING_FIELD_RE = re.compile(rb"\n(host|content-length|transfer-encoding):([^\r\n]*)")
_CONTROL_RE = re.compile(rb"[\x00-\x1f\x7f]")
_DIGITS_RE = re.compile(rb"[0-9]{1,20}")  # h11's bound: 20 digits


class RequestLine(NamedTuple):
    """A request line that passed :func:`check_request_line`."""

    method: bytes
    target: bytes
    version: tuple[int, int]


class Framing(NamedTuple):
    """How the request body is delimited, once the head passed :func:`check_headers`."""

    content_length: int | None
    chunked: bool


def _refuse(reason: str, rule: str, status: int = HTTPStatus.BAD_REQUEST) -> InvalidRequest:
    return InvalidRequest(int(status), reason, rule)


def _strip_eol(line: bytes) -> bytes | None:
    # RFC 9112 2.2: a line ends in CRLF; a recipient MAY take a lone LF as the
    # end (h11 and pywsgi do). No terminator: the head was cut short.
    if line.endswith(b"\r\n"):
        return line[:-2]
    if line.endswith(b"\n"):
        return line[:-1]
    return None


def check_request_line(line: bytes) -> RequestLine:
    """Check a raw request line (with its CRLF); return its parts.

    Raises :class:`~gstream.errors.InvalidRequest`: 400 for anything but
    ``token SP visible-ASCII SP HTTP/d.d`` (a control character, a bare CR,
    extra whitespace, an HTTP/0.9 line), 505 for a major version other than 1.
    """
    body = _strip_eol(line)
    if body is None:
        raise _refuse("incomplete request line", "RFC 9112 2.2")
    match = _REQUEST_LINE_RE.fullmatch(body)
    if match is None:
        if _CONTROL_RE.search(body):
            raise _refuse("control character in the request line", "RFC 9112 3")
        raise _refuse("malformed request line", "RFC 9112 3")
    version = (int(match["major"]), int(match["minor"]))
    if version[0] != 1:
        raise _refuse("HTTP version not supported", "RFC 9110 15.6.6",
                      HTTPStatus.HTTP_VERSION_NOT_SUPPORTED)
    return RequestLine(match["method"], match["target"], version)


def _field_error(body: bytes) -> InvalidRequest:
    """The most specific reason a header line did not match the grammar."""
    if body[:1] in (b" ", b"\t"):
        # RFC 9112 5.2 lets a server reject obs-fold or replace it with
        # spaces; gunicorn rejects it by default, and so does gstream.
        return _refuse("obs-fold (a header line starting with whitespace)", "RFC 9112 5.2")
    colon = body.find(b":")
    if colon <= 0:
        return _refuse("header line without a name and colon", "RFC 9112 5")
    name = body[:colon]
    if name != name.rstrip(b" \t"):
        return _refuse("whitespace between a header name and the colon", "RFC 9112 5.1")
    if not _TOKEN_RE.fullmatch(name):
        return _refuse("invalid header name", "RFC 9110 5.1")
    shown = name.decode("ascii")  # a token: safe to echo
    value = body[colon + 1:]
    if b"\r" in value:
        return _refuse(f"bare CR in header {shown}", "RFC 9112 2.2")
    if b"\x00" in value:
        return _refuse(f"NUL in header {shown}", "RFC 9110 5.5")
    return _refuse(f"invalid character in header {shown}", "RFC 9110 5.5")


def check_headers(lines: Sequence[bytes], version: tuple[int, int]) -> Framing:
    """Check the raw header lines of a request; return its body framing.

    ``lines`` is every line read after the request line, each with its line
    terminator, up to and including the empty line that ends the head.
    ``version`` is the request line's. Each line must be
    ``token ":" OWS field-value OWS`` (no obs-fold, no space before the
    colon, no NUL or CR in the value), then :func:`check_fields` applies.
    Raises :class:`~gstream.errors.InvalidRequest` (400, 431 or 501).
    """
    if len(lines) - 1 > MAX_FIELDS:
        raise head_too_large(f"more than {MAX_FIELDS} header lines")
    head = b"".join(lines)
    if _HEAD_RE.fullmatch(head) is None:
        raise _head_error(lines)
    # Values' case does not matter to the framing rules; names' never does.
    return check_fields(_FRAMING_FIELD_RE.findall(b"\n" + head.lower()), version)


def _head_error(lines: Sequence[bytes]) -> InvalidRequest:
    """Why a head failed :data:`_HEAD_RE`: the first bad line's reason."""
    if not lines or _strip_eol(lines[-1]) != b"":
        return _refuse("incomplete request head", "RFC 9112 2.2")
    for line in lines[:-1]:
        if _FIELD_LINE_RE.fullmatch(line) is None:
            body = _strip_eol(line)
            if body is None:
                return _refuse("incomplete request head", "RFC 9112 2.2")
            return _field_error(body)
    return _refuse("malformed request head", "RFC 9112 5")


def check_fields(fields: Iterable[tuple[bytes, bytes]], version: tuple[int, int]) -> Framing:
    """Check the parsed header fields (name, value) of a request.

    The rules about what the fields say together: one Host (none only
    before HTTP/1.1), one plain decimal Content-Length, no transfer coding
    but a single ``chunked``, never both. Used by :func:`check_headers`,
    and alone where another parser has checked the grammar (gunicorn's).
    Raises :class:`~gstream.errors.InvalidRequest` (400 or 501).
    """
    hosts = 0
    lengths: list[bytes] = []
    codings: list[bytes] = []
    for raw_name, raw_value in fields:
        name = raw_name.lower()
        value = raw_value.strip(b" \t")
        if name == b"host":
            hosts += 1
        elif name == b"content-length":
            lengths.append(value)
        elif name == b"transfer-encoding":
            # RFC 9110 5.3: repeated lines are one comma-separated list.
            codings += (c.strip(b" \t").lower() for c in value.split(b","))

    # RFC 9112 3.2: a server MUST answer 400 to an HTTP/1.1 request without
    # a Host header, and to any request with more than one.
    if hosts == 0 and version >= (1, 1):
        raise _refuse("no Host header in an HTTP/1.1 request", "RFC 9112 3.2")
    if hosts > 1:
        raise _refuse("more than one Host header", "RFC 9112 3.2")

    content_length: int | None = None
    if lengths:
        # RFC 9110 8.6 lets a recipient reject repeated values or take one of
        # equal ones; like gunicorn, gstream rejects any repetition. 1*DIGIT:
        # no sign, no list, no spaces inside (int() would accept "+5").
        if len(lengths) > 1:
            raise _refuse("more than one Content-Length", "RFC 9110 8.6")
        if not _DIGITS_RE.fullmatch(lengths[0]):
            raise _refuse("invalid Content-Length", "RFC 9110 8.6")
        content_length = int(lengths[0])

    chunked = False
    if codings:
        # pywsgi and gunicorn can only undo chunked. RFC 9112 6.1: a server
        # SHOULD answer 501 to a coding it does not understand; h11 does for
        # any coding but chunked ("identity" and empty list elements too).
        if any(c != b"chunked" for c in codings):
            raise _refuse("transfer coding not implemented", "RFC 9112 6.1",
                          HTTPStatus.NOT_IMPLEMENTED)
        if len(codings) > 1:
            raise _refuse("chunked applied more than once", "RFC 9112 6.1")
        if version < (1, 1):
            # RFC 9112 6.1: the framing of an HTTP/1.0 message with
            # Transfer-Encoding is faulty; gunicorn refuses it.
            raise _refuse("Transfer-Encoding in an HTTP/1.0 request", "RFC 9112 6.1")
        if content_length is not None:
            # RFC 9112 6.1 lets a server reject this or let Transfer-Encoding
            # win; the front proxy may have read it the other way, so the
            # safe answer (gunicorn's) is to refuse.
            raise _refuse("both Transfer-Encoding and Content-Length", "RFC 9112 6.1")
        chunked = True
    return Framing(content_length, chunked)


def head_too_large(what: str) -> InvalidRequest:
    """The 431 for a request head past a size limit (a reader enforces the limits)."""
    return _refuse(f"request header fields too large: {what}", "RFC 6585 5",
                   HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)


def error_response(exc: InvalidRequest) -> bytes:
    """The complete response to send for ``exc``; the connection closes after it."""
    body = exc.reason.encode("ascii", "replace") + b"\n"
    phrase = HTTPStatus(exc.status).phrase
    return (f"HTTP/1.1 {exc.status} {phrase}\r\nConnection: close\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode("ascii") + body
