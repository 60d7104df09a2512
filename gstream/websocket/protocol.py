"""websockets' ``ServerProtocol`` with the two strictness fixes gstream needs.

A Close between fragments is answered with the peer's code, and a parser failure can be held
until the messages before it are answered. docs/websocket.md, "Strictness".
"""

from __future__ import annotations

from typing import Any

from websockets.frames import CloseCode
from websockets.protocol import OPEN
from websockets.server import ServerProtocol

__all__ = ["GStreamProtocol"]


class GStreamProtocol(ServerProtocol):
    """A ``ServerProtocol`` that can hold a failure back and takes a Close between fragments.

    Attributes:
        hold_failures: set by the connection while it feeds data in; a
            failure raised meanwhile is stored in ``held_failure``.
        held_failure: ``(code, reason)`` of the held failure, or None.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Set here, with websockets' own attributes, rather than first
        # assigned in the read path: every instance then has the same
        # attribute layout (CPython's shared-key instance dicts).
        self.hold_failures = False
        self.held_failure: tuple[int, str] | None = None

    def fail(self, code: int, reason: str = "") -> None:
        """Fail the connection (RFC 6455 7.1.7), or hold it while ``hold_failures``."""
        close = self.close_rcvd
        if code == CloseCode.PROTOCOL_ERROR and close is not None and self.state is OPEN:
            # The parser refused the peer's Close only because it came in the
            # middle of a fragmented message (the one case where websockets
            # fails with a Close received but not answered): answer it like
            # any Close, with its code. An empty Close (1005) gets 1000.
            code = int(close.code) if close.code != CloseCode.NO_STATUS_RCVD else 1000
            reason = close.reason if code == close.code else ""
        if self.hold_failures and self.state is OPEN:
            if self.held_failure is None:  # the first failure wins
                self.held_failure = (int(code), reason)
            return
        super().fail(code, reason)

    def release_failure(self) -> None:
        """Fail the connection with the held failure, if any (a no-op otherwise)."""
        held, self.held_failure = self.held_failure, None
        if held is not None:
            super().fail(*held)
