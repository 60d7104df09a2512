"""The access line of gstream's pywsgi handlers (``AccessLine`` mixin).

pywsgi's own line names the socket's peer, which behind a trusted reverse
proxy is the proxy; and for an error answered before the application (408,
431) it names the previous response's status. docs/server.md.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

__all__ = ["AccessLine"]


class AccessLine:
    """Mixin for a pywsgi ``WSGIHandler``: the client and status in the access line.

    The address is the environ's ``REMOTE_ADDR``: the peer's, or the client a
    trusted proxy forwarded for (:mod:`gstream.proxy`). A head that never
    became a request (no environ) names the peer.
    """

    __slots__ = ()

    environ: Any
    client_address: Any
    status: Any
    time_start: float
    time_finish: float
    requestline: Any
    response_length: Any

    def handle_one_request(self) -> Any:
        # The last request's environ is not this one's: not for the access
        # line of a head that fails.
        self.environ = None
        return super().handle_one_request()  # type: ignore[misc]

    def format_request(self) -> str:
        """pywsgi's access line, naming the forwarded client and the status sent."""
        env: dict[str, Any] | None = self.environ
        addr = env.get("REMOTE_ADDR") if env else None
        if not addr:
            peer = self.client_address
            addr = peer[0] if isinstance(peer, tuple) else peer
        status = self.status
        if isinstance(status, bytes):
            status = status.decode("latin-1")
        took = f"{self.time_finish - self.time_start:.6f}" if self.time_finish else "-"
        now = datetime.now().replace(microsecond=0)
        return (f'{addr or "-"} - - [{now}] "{self.requestline or ""}" '
                f'{(status or "000").split()[0]} {self.response_length or "-"} {took}')
