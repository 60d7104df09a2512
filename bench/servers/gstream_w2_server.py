"""gstream, 2 workers: gstream_server.py's app under gstream.workers.Supervisor.

What ``gstream serve --workers 2`` runs: the parent binds the port once and
forks two workers; each imports gstream_server.py (its ``app``, the same
handlers, the same echo) after the fork and serves the shared socket. Echo
only (``kinds: []``): the fan-out scenarios need one broker/hub seeing every
subscriber, which two processes only have through the Redis backplane.
Not a peer: a multi-process configuration of gstream itself. The runner counts
the workers' CPU and memory with the parent's (bench/common.py proc_tree_*).
``BENCH_GSTREAM_WORKERS`` changes the count (default 2).
"""

from gevent import monkey

monkey.patch_all()  # as `gstream serve` does, before anything else is imported

import importlib  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from common import announce_ready, announce_unavailable, server_args  # noqa: E402

args = server_args()
WORKERS = int(os.environ.get("BENCH_GSTREAM_WORKERS", "2"))

try:
    from gstream.workers import Supervisor
except Exception as exc:  # pragma: no cover - a branch without gstream.workers
    announce_unavailable(f"gstream.workers not importable: {exc}")


def load_app():  # type: ignore[no-untyped-def]
    """In each worker, after the fork: gstream_server.py's app (not its server)."""
    return importlib.import_module("gstream_server").app


def ready(sup) -> None:  # type: ignore[no-untyped-def]
    announce_ready(sup.port, server=f"gstream.workers.Supervisor ({WORKERS} workers)",
                   kinds=[], idle_kinds=[], echo=True, legacy=None, workers=WORKERS)


if __name__ == "__main__":
    sys.exit(Supervisor(host=args.host, port=args.port, workers=WORKERS, load_app=load_app,
                        ready=ready, backlog=4096, max_connections=19_500).run())
