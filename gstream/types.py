"""Type aliases and the string-enum base shared by several gstream modules.

Pure: imports nothing of gevent, so any module, including the pure core, can use it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

__all__ = ["Message", "Environ", "StartResponse", "WSGIApp", "Headers", "StrEnum"]

#: A WebSocket or hub message: text (``str``) or binary (``bytes``).
Message = str | bytes

#: A WSGI environ.
Environ = dict[str, Any]

#: The WSGI ``start_response`` callable; it returns the legacy ``write`` callable.
StartResponse = Callable[..., Callable[[bytes], Any]]

#: A WSGI application.
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]

#: Response headers, as WSGI's ``start_response`` takes them.
Headers = list[tuple[str, str]]


_E = TypeVar("_E", bound="StrEnum")


class StrEnum(str, enum.Enum):
    """An enum whose members are strings: they compare equal to their values.

    So the public API takes ``"close"`` or ``SlowPolicy.CLOSE`` alike, and
    ``str()``, ``format()`` and ``json.dumps`` give the plain value on every
    supported Python (``enum.StrEnum`` itself needs 3.11).
    """

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def parse(cls: type[_E], value: object, what: str) -> _E:
        """Return the member equal to ``value``, or raise a ``ValueError`` naming ``what``."""
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in cls)
            raise ValueError(f"{what} must be one of {allowed}, got {value!r}") from None
