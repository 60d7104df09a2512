"""The demo lives in the package (``gstream/demo/``) so that ``gstream demo``
works from an installed gstream; this is a pointer (see docs/demo.md)."""
