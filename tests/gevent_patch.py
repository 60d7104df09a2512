"""Loaded with ``-p`` before any other plugin so that gevent patches the
standard library before anything imports ssl or socket (as a legacy app
served by gstream would be patched)."""

from gevent import monkey

monkey.patch_all()
