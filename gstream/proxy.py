"""Proxy headers: what a trusted reverse proxy says about the client (pure: no I/O).

:class:`ProxyHeaders` decides from the peer's address whether to believe
``X-Forwarded-For``/``-Proto``/``-Host`` (or RFC 7239 ``Forwarded``) and, if
so, rewrites ``REMOTE_ADDR``, ``wsgi.url_scheme`` and ``HTTP_HOST`` in a WSGI
environ. The rules are in docs/deploy.md.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
from collections.abc import Iterable, MutableMapping
from typing import Any

__all__ = ["ProxyHeaders", "DEFAULT_FORWARDED_ALLOW_IPS", "parse_forwarded", "PEER_KEY"]

log = logging.getLogger("gstream.proxy")

#: Trusted by default, as in gunicorn and uvicorn: a proxy on the same host.
DEFAULT_FORWARDED_ALLOW_IPS = "127.0.0.1,::1"

#: Environ key holding the peer's own address (the proxy's) once the headers
#: changed something. One string, not a copy of every replaced value: a
#: WebSocket keeps its environ for life.
PEER_KEY = "gstream.proxy.peer"

_IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# (IP version, address as an int, canonical text)
_IP = tuple[int, int, str]
_V4_MAPPED = bytes(10) + b"\xff\xff"

_SCHEMES = {"http": "http", "https": "https", "ws": "http", "wss": "https"}
# host[:port]: a reg-name or IPv4 (RFC 3986 unreserved + sub-delims, no
# userinfo) or a bracketed IPv6 literal. Anything else is not a Host value.
_HOST = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=%]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?").fullmatch
# RFC 7239 forwarded-pair: token "=" ( token / quoted-string ).
_PAIR = re.compile(r'\s*([!#$%&\'*+\-.^_`|~0-9A-Za-z]+)=("(?:[^"\\]|\\.)*"|[^;,"\s]*)\s*')


def parse_forwarded(value: str) -> list[dict[str, str]] | None:
    """The elements of an RFC 7239 ``Forwarded`` value, left to right.

    Each element maps lower-case parameter names to unquoted values:
    ``for=1.2.3.4;proto=https, for="[::1]:80"`` gives
    ``[{"for": "1.2.3.4", "proto": "https"}, {"for": "[::1]:80"}]``.
    Returns None when the value does not follow the grammar.
    """
    elements: list[dict[str, str]] = []
    current: dict[str, str] = {}
    pos, end = 0, len(value)
    while pos < end:
        c = value[pos]
        if c in " \t;" or (c == "," and not current):
            pos += 1  # whitespace, or an empty pair or element: the list syntax allows them
            continue
        if c == ",":
            elements.append(current)
            current = {}
            pos += 1
            continue
        m = _PAIR.match(value, pos)
        if m is None:
            return None
        name, raw = m.group(1).lower(), m.group(2)
        if raw.startswith('"'):
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        if name in current:
            return None  # RFC 7239 4: a parameter at most once per element
        current[name] = raw
        pos = m.end()
        if pos < end and value[pos] not in ",;":
            return None
    if current:
        elements.append(current)
    return elements


def _split_node(node: str) -> tuple[str, str | None]:
    """``(address, port)`` of ``1.2.3.4``, ``1.2.3.4:80``, ``::1``, ``[::1]:80``."""
    node = node.strip()
    if node.startswith("["):
        addr, _, rest = node[1:].partition("]")
        return addr, rest[1:] if rest.startswith(":") else None
    if node.count(":") == 1:  # IPv4 (or a name) with a port
        addr, _, port = node.partition(":")
        return addr, port
    return node, None


def _ip(text: str | None) -> _IP | None:
    """(version, integer, canonical text) of an IP literal; None if it is not one.

    inet_pton (C) rather than :mod:`ipaddress` (pure Python, several times
    slower; docs/performance.md): it runs for every proxied request. A conversion, no socket.
    """
    if not text:
        return None
    try:
        if ":" in text:
            packed = socket.inet_pton(socket.AF_INET6, text)
            if packed[:12] == _V4_MAPPED:  # a dual-stack socket's view of an IPv4 peer
                v4 = packed[12:]
                return 4, int.from_bytes(v4, "big"), socket.inet_ntop(socket.AF_INET, v4)
            return 6, int.from_bytes(packed, "big"), socket.inet_ntop(socket.AF_INET6, packed)
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big"), text
    except (OSError, ValueError):
        return None


def _last(value: str | None) -> str | None:
    """The nearest proxy's entry of a comma-separated header (the last one)."""
    if not value:
        return None
    parts = [p.strip() for p in value.split(",")]
    return parts[-1] or None


class ProxyHeaders:
    """The peers trusted to speak for clients, and how their headers rewrite an environ.

    Args:
        forwarded_allow_ips: a comma-separated string or an iterable of IP
            addresses and networks (``10.0.0.0/8``); ``"*"`` trusts every
            peer (only when nothing but the proxy can reach the server).
            The default trusts loopback only, like gunicorn and uvicorn.

    Raises :class:`ValueError` for an entry that is neither ``*``, an
    address nor a network.
    """

    __slots__ = ("trust_all", "networks", "_text", "_masks")

    def __init__(self, forwarded_allow_ips: str | Iterable[str] = DEFAULT_FORWARDED_ALLOW_IPS) -> None:
        entries = (forwarded_allow_ips.split(",") if isinstance(forwarded_allow_ips, str)
                   else list(forwarded_allow_ips))
        networks: list[_IPNetwork] = []
        trust_all = False
        for entry in (e.strip() for e in entries):
            if not entry:
                continue
            if entry == "*":
                trust_all = True
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                raise ValueError(f"forwarded_allow_ips: {entry!r} is not an IP address, "
                                 "a network like 10.0.0.0/8, or '*'") from None
        self.trust_all = trust_all
        """True when every peer is trusted (``*``)."""
        self.networks: tuple[_IPNetwork, ...] = tuple(networks)
        """The trusted addresses and networks."""
        self._text = "*" if trust_all else ",".join(str(n) for n in networks)
        self._masks = tuple((n.version, int(n.network_address), int(n.netmask)) for n in networks)

    def __repr__(self) -> str:
        return f"ProxyHeaders({self._text!r})"

    def trusts(self, peer: str | None) -> bool:
        """Whether ``peer`` (an address as in ``REMOTE_ADDR``) may set proxy headers.

        An empty or missing peer is a Unix-socket connection, trusted as in
        gunicorn: the socket file's permissions decide who may connect.
        A peer that is not an IP address is not trusted.
        """
        if self.trust_all or not peer:
            return True
        ip = _ip(peer)
        return ip is not None and self._trusts_ip(ip)

    def _trusts_ip(self, ip: _IP) -> bool:
        version, value = ip[0], ip[1]
        return self.trust_all or any(version == v and value & mask == net
                                     for v, net, mask in self._masks)

    def apply(self, environ: MutableMapping[str, Any]) -> bool:
        """Rewrite ``environ`` from the proxy headers if its peer is trusted.

        ``REMOTE_ADDR`` (and ``REMOTE_PORT`` when the proxy gives one) become
        the client's, ``wsgi.url_scheme`` the scheme the client used and
        ``HTTP_HOST`` the host it asked for; the proxy's address is kept
        under :data:`PEER_KEY`. When any ``X-Forwarded-*`` header is
        present, ``Forwarded`` is ignored (one proxy, one convention).
        Returns True when something changed.
        """
        xff = environ.get("HTTP_X_FORWARDED_FOR")
        xproto = environ.get("HTTP_X_FORWARDED_PROTO")
        xhost = environ.get("HTTP_X_FORWARDED_HOST")
        forwarded = environ.get("HTTP_FORWARDED")
        # Most requests carry none: skip parsing the peer's address for them.
        if not (xff or xproto or xhost or forwarded) or not self.trusts(environ.get("REMOTE_ADDR")):
            return False
        client: str | None
        proto: str | None
        host: str | None
        if xff or xproto or xhost:
            client = self._client(xff.split(",")) if xff else None
            proto, host = _last(xproto), _last(xhost)
        else:
            elements = parse_forwarded(str(forwarded))
            if not elements:
                log.info("ignoring a malformed Forwarded header from %s: %.100r",
                         environ.get("REMOTE_ADDR") or "unix socket", forwarded)
                return False
            # The element describing the client's own connection: the one the
            # walk over trusted proxies stops at.
            i = self._client_index([e.get("for", "") for e in elements])
            client = elements[i].get("for")
            proto, host = elements[i].get("proto"), elements[i].get("host")
        return self._rewrite(environ, client, proto, host)

    def _client_index(self, nodes: list[str]) -> int:
        """From the right, skip trusted proxies; the first other node is the client."""
        for i in range(len(nodes) - 1, -1, -1):
            ip = _ip(_split_node(nodes[i])[0])
            if ip is None or not self._trusts_ip(ip):
                return i
        return 0  # every hop trusted: the first one is the client

    def _client(self, nodes: list[str]) -> str | None:
        nodes = [n.strip() for n in nodes]
        return nodes[self._client_index(nodes)] if nodes else None

    def _rewrite(self, environ: MutableMapping[str, Any], client: str | None,
                 proto: str | None, host: str | None) -> bool:
        peer = environ.get("REMOTE_ADDR", "")
        changed = False

        def put(key: str, value: str) -> None:
            nonlocal changed
            if environ.get(key) != value:
                environ[key] = value
                changed = True

        if client:
            addr, port = _split_node(client)
            ip = _ip(addr)
            if ip is not None:
                put("REMOTE_ADDR", ip[2])
                if port and port.isdigit() and int(port) < 65536:
                    put("REMOTE_PORT", port)
            elif client.lower() != "unknown" and not client.startswith("_"):
                # "unknown" and "_obfuscated" are RFC 7239's; anything else is a bad header.
                log.info("ignoring a forwarded client address that is not an IP: %.100r", client)
        if proto:
            scheme = _SCHEMES.get(proto.lower())
            if scheme is not None:
                put("wsgi.url_scheme", scheme)
            else:
                log.info("ignoring a forwarded scheme that is not http or https: %.100r", proto)
        if host:
            if _HOST(host):
                put("HTTP_HOST", host)
            else:
                log.info("ignoring a forwarded host that is not host[:port]: %.100r", host)
        if changed:
            environ[PEER_KEY] = peer
        return changed
