"""gstream, 2 workers, echo served by in-loop callbacks.

gstream_w2_server.py with ``BENCH_GSTREAM_ECHO_CALLBACK=in_loop``: each worker's echo is
``websocket_callback_app(on_open, lambda ws, m: ws.send(m), in_loop=True)`` (on_message called
from the read callback, no greenlet switch) instead of ``for m in ws: ws.send(m)``. The fastest
form gstream offers for request/response traffic (docs/performance.md, ninth round); not a peer.
"""

import os
import runpy

os.environ["BENCH_GSTREAM_ECHO_CALLBACK"] = "in_loop"
runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "gstream_w2_server.py"),
               run_name="__main__")
