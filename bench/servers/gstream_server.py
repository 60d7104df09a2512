"""gstream under test: SSEBroker for /sse, websocket_app for /echo, Hub for /ws.

Written against the API names of issues 3-6. Until those modules exist on the
branch being benchmarked (the runner puts that branch first on PYTHONPATH),
this server reports what is missing and exits 3, and the runner shows
"not available" in the tables. Each piece is optional: with only the broker,
the SSE scenarios run and the WebSocket ones are skipped.

PLUG-IN POINTS for the lead are marked ``# PLUG-IN``.
"""

from gevent import monkey

monkey.patch_all()

import importlib  # noqa: E402
import inspect  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402
from _base import listen, make_flask_app, simple_response  # noqa: E402
from common import (  # noqa: E402
    announce_ready,
    announce_unavailable,
    make_payload,
    parse_publish_query,
    server_args,
)

args = server_args()
HB = args.heartbeat
missing: list[str] = []

try:
    import gstream
    from gstream import Event
except Exception as exc:  # pragma: no cover - depends on the branch
    announce_unavailable(f"gstream not importable: {exc}")

GSTREAM_DIR = os.path.dirname(os.path.abspath(gstream.__file__))


def _find(name: str, *modules: str):  # type: ignore[no-untyped-def]
    """``gstream.<name>`` (the public export), else ``<module>.<name>``.

    Refuses objects defined in another checkout: an editable install of
    gstream (``pip install -e``) puts a finder on sys.meta_path that can
    satisfy ``gstream.x`` from *its* tree even when ``gstream`` itself came
    from --gstream-path, and a benchmark of a mix would be meaningless.
    """
    err: Exception = ImportError(name)
    for modname in ("gstream", *modules):
        try:
            obj = getattr(importlib.import_module(modname), name)
        except (ImportError, AttributeError) as exc:
            err = exc
            continue
        where = os.path.dirname(os.path.abspath(sys.modules[obj.__module__].__file__ or ""))
        if where != GSTREAM_DIR and not where.startswith(GSTREAM_DIR + os.sep):  # sub-packages
            raise ImportError(f"{name} comes from {where}, not {GSTREAM_DIR}")
        return obj
    raise err


def _optional(name: str, *modules: str):  # type: ignore[no-untyped-def]
    try:
        return _find(name, *modules)
    except Exception as exc:
        missing.append(f"{name} ({exc})"[:160])
        return None


SSEBroker = _optional("SSEBroker", "gstream.broker")  # PLUG-IN: names of issues 3-6
websocket_app = _optional("websocket_app", "gstream.websocket", "gstream.wsupgrade")
Hub = _optional("Hub", "gstream.hub")
websocket_callback_app = _optional("websocket_callback_app", "gstream.websocket", "gstream.wsupgrade")


def _accepts(fn, name: str) -> bool:  # type: ignore[no-untyped-def]
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def make_broker():  # type: ignore[no-untyped-def]
    """PLUG-IN: the broker with a heartbeat of HB seconds (0 = none).

    Subscribers ask for ``?buffer=1024`` (the peers' queues are unbounded, so a
    64-event default buffer would turn the back-to-back fan-out bursts into
    drop-oldest losses); the subscriber cap is lifted for the 15,000-connection
    idle run.
    """
    fields = {"heartbeat_interval": HB if HB > 0 else None, "max_buffer": 1024,
              "max_subscribers": 0}
    cfg_cls = _optional("BrokerConfig", "gstream.broker")
    if cfg_cls is not None:
        params = inspect.signature(cfg_cls).parameters
        return SSEBroker(cfg_cls(**{k: v for k, v in fields.items() if k in params}))
    params = inspect.signature(SSEBroker).parameters
    return SSEBroker(**{k: v for k, v in fields.items() if k in params})


def make_ws_config():  # type: ignore[no-untyped-def]
    """PLUG-IN: a WSConfig whose idle ping fires every HB seconds (None = library default)."""
    cfg_cls = _optional("WSConfig", "gstream.wsconfig", "gstream.websocket")
    if cfg_cls is None or HB <= 0:
        return None
    for name in ("read_idle_timeout", "idle_timeout", "ping_interval"):
        if _accepts(cfg_cls, name):
            return cfg_cls(**{name: HB})
    return None


broker = make_broker() if SSEBroker is not None else None
ws_config = make_ws_config() if websocket_app is not None else None
hub = Hub() if Hub is not None and websocket_app is not None else None
if hub is not None:
    gevent.spawn(hub.run)  # PLUG-IN: drop if Hub starts its own greenlet


def _ws_app(handler):  # type: ignore[no-untyped-def]
    return websocket_app(handler, ws_config) if ws_config is not None else websocket_app(handler)


def echo_handler(ws):  # type: ignore[no-untyped-def]
    for message in ws:
        ws.send(message)


def hub_member(ws):  # type: ignore[no-untyped-def]
    hub.register(ws)
    try:
        for _ in ws:
            pass
    finally:
        hub.unregister(ws)


echo_app = _ws_app(echo_handler) if websocket_app is not None else None
ECHO_CALLBACK = os.environ.get("BENCH_GSTREAM_ECHO_CALLBACK", "")
if echo_app is not None and websocket_callback_app is not None and ECHO_CALLBACK:
    # The callback form of the same echo (docs/performance.md, eighth round);
    # "in_loop": on_message called from the read callback (ninth round).
    in_loop = {"in_loop": True} if ECHO_CALLBACK == "in_loop" else {}
    echo_app = websocket_callback_app(lambda ws: None, lambda ws, m: ws.send(m), ws_config,
                                      **in_loop)
def idle_member(ws):  # type: ignore[no-untyped-def]
    for _ in ws:
        pass


# Hub members are served by callbacks where gstream has them (the idiom its
# docs give for room members: no greenlet parked per idle connection);
# BENCH_GSTREAM_WS_GREENLET=1 measures the `for m in ws` form instead.
# Without a Hub, /ws still holds idle WebSocket connections (idle scenario only).
if hub is not None and websocket_callback_app is not None and not os.environ.get(
        "BENCH_GSTREAM_WS_GREENLET"):
    hub_app = websocket_callback_app(hub.register, None, ws_config)
else:
    hub_app = _ws_app(hub_member if hub is not None else idle_member) if websocket_app else None
flask_app = make_flask_app()


def publisher(p: dict) -> None:
    sse = p["kind"] == "sse"
    for seq in range(p["n"]):
        msg = make_payload(p["run"], seq, p["size"])
        if sse:
            broker.publish(Event(data=msg))  # PLUG-IN: publish API
        else:
            hub.broadcast(msg)  # PLUG-IN: broadcast API
        gevent.sleep(p["interval"])


def app(environ, start_response):  # type: ignore[no-untyped-def]
    path = environ["PATH_INFO"]
    if path == "/sse" and broker is not None:
        return broker.subscribe(environ, start_response)
    if path == "/ws" and hub_app is not None:
        return hub_app(environ, start_response)
    if path == "/echo" and echo_app is not None:
        return echo_app(environ, start_response)
    if path == "/view":
        return flask_app(environ, start_response)
    if path == "/publish":
        gevent.spawn(publisher, parse_publish_query(environ.get("QUERY_STRING", "")))
        return simple_response(start_response, b"ok\n")
    return simple_response(start_response, b"not found\n", "404 Not Found")


kinds = (["sse"] if broker is not None else []) + (["ws"] if hub is not None else [])
if not kinds and echo_app is None:
    announce_unavailable("missing: " + ", ".join(missing))

idle_kinds = (["sse"] if broker is not None else []) + (["ws"] if hub_app is not None else [])
info = {"kinds": kinds, "idle_kinds": idle_kinds, "echo": echo_app is not None, "legacy": "sse" if broker else None,
        "missing": missing}
Server = _optional("Server", "gstream.server")
serve = _optional("serve", "gstream.server")  # PLUG-IN: serve(app, host, port, ready=..., **opts)


def main() -> None:
    """Serve ``app`` in this process (gstream_w2_server.py imports ``app`` instead)."""
    if serve is not None:
        # gstream's own server binds the port itself; the runner passes a free one.
        # Its default connection cap (10,000) would cut the 15,000-connection idle
        # run short, so raise it toward the fd limit.
        opts = {"backlog": 4096, "max_connections": 19_500, "install_signals": False}
        params = set(inspect.signature(Server.__init__).parameters) if Server else set()
        params |= {"install_signals", "ready"}
        opts = {k: v for k, v in opts.items() if k in params}

        def _ready(server) -> None:  # type: ignore[no-untyped-def]
            announce_ready(getattr(server, "port", args.port), server="gstream.server.serve", **info)

        serve(app, args.host, args.port, ready=_ready, **opts)
    else:
        from gevent.pywsgi import WSGIServer

        handler_class = getattr(gstream, "GStreamHandler", None)  # PLUG-IN: gstream's pywsgi handler
        sock = listen(args.host, args.port)
        kw = {"handler_class": handler_class} if handler_class is not None else {}
        announce_ready(sock.getsockname()[1], server="gevent.pywsgi", **info)
        WSGIServer(sock, app, log=None, **kw).serve_forever()


if __name__ == "__main__":
    main()
