"""``python -m gstream``: the command line."""

from gstream.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
