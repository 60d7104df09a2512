"""The gstream demo: ``gstream demo`` serves it (see docs/demo.md).

``make_app()`` returns the WSGI application; ``gstream serve
"gstream.demo:make_app()"`` serves it like any other app.
"""

from __future__ import annotations

from .app import DemoApp, make_app

__all__ = ["DemoApp", "make_app"]
