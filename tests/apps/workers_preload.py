"""``gstream.workers.Supervisor`` from Python, the app imported before the fork.

Run as ``python -m tests.apps.workers_preload PORT``: the parent is
monkey-patched and has a running gevent hub (as a program that did some work
before serving would); each worker must start from a re-initialised loop.
Prints the URL once both workers serve.
"""

from gevent import monkey

monkey.patch_all()

import logging  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402

from gstream.workers import Supervisor  # noqa: E402
from tests.apps.workers_app import app  # noqa: E402

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="[%(process)d] %(name)s: %(message)s")
    gevent.sleep(0.01)  # the parent's hub exists and its loop has run
    sup = Supervisor(app, "127.0.0.1", int(sys.argv[1]), workers=2, shutdown_timeout=3,
                     ready=lambda s: print(s.url, flush=True))
    sys.exit(sup.run())
