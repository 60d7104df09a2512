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


def _same_tree(module_name: str) -> None:
    """Refuse modules from another checkout.

    An editable install of gstream (``pip install -e``) puts a finder on
    sys.meta_path that can satisfy ``gstream.x`` from *its* tree even when
    ``gstream`` itself came from --gstream-path: never benchmark a mix.
    """
    mod = sys.modules[module_name]
    where = os.path.dirname(os.path.abspath(mod.__file__ or ""))
    if where != GSTREAM_DIR:
        raise ImportError(f"{module_name} comes from {where}, not {GSTREAM_DIR}")


try:
    from gstream.broker import SSEBroker

    _same_tree("gstream.broker")
except Exception as exc:
    SSEBroker = None  # type: ignore[assignment,misc]
    missing.append(f"broker ({exc.__class__.__name__})")
try:
    from gstream.websocket import websocket_app

    _same_tree("gstream.websocket")
except Exception as exc:
    websocket_app = None  # type: ignore[assignment]
    missing.append(f"websocket ({exc.__class__.__name__})")
try:
    from gstream.hub import Hub

    _same_tree("gstream.hub")
except Exception as exc:
    Hub = None  # type: ignore[assignment,misc]
    missing.append(f"hub ({exc.__class__.__name__})")


def _accepts(fn, name: str) -> bool:  # type: ignore[no-untyped-def]
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def make_broker():  # type: ignore[no-untyped-def]
    """PLUG-IN: build the broker with a heartbeat of HB seconds (0 = none).

    Tries the likely spellings; replace with the real one-liner once known,
    e.g. ``SSEBroker(BrokerConfig(heartbeat_interval=HB))``.
    """
    cfg_cls = getattr(gstream, "BrokerConfig", None) or getattr(
        __import__("gstream.broker", fromlist=["x"]), "BrokerConfig", None
    )
    hb = HB if HB > 0 else 3600.0
    if cfg_cls is not None:
        for name in ("heartbeat_interval", "heartbeat"):
            if _accepts(cfg_cls, name):
                cfg = cfg_cls(**{name: hb})
                try:
                    return SSEBroker(cfg)
                except TypeError:
                    return SSEBroker(config=cfg)
    for name in ("heartbeat_interval", "heartbeat"):
        if _accepts(SSEBroker, name):
            return SSEBroker(**{name: hb})
    return SSEBroker()


def make_ws_config():  # type: ignore[no-untyped-def]
    """PLUG-IN: a WSConfig whose idle ping fires every HB seconds (None = library default)."""
    cfg_cls = getattr(gstream, "WSConfig", None)
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
hub_app = _ws_app(hub_member) if hub is not None else None
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

info = {"kinds": kinds, "echo": echo_app is not None, "legacy": "sse" if broker else None,
        "missing": missing}
try:
    from gstream.server import Server, serve  # PLUG-IN: serve(app, host, port, ready=..., **opts)

    _same_tree("gstream.server")
except Exception as exc:
    serve = None  # type: ignore[assignment]
    info["missing"].append(f"server ({exc.__class__.__name__})")

if serve is not None:
    # gstream's own server binds the port itself; the runner passes a free one.
    # Its default connection cap (10,000) would cut the 15,000-connection idle
    # run short, so raise it toward the fd limit.
    opts = {"backlog": 4096, "max_connections": 19_500, "install_signals": False}
    params = set(inspect.signature(Server.__init__).parameters) | {"install_signals", "ready"}
    opts = {k: v for k, v in opts.items() if k in params}

    def _ready(server) -> None:  # type: ignore[no-untyped-def]
        announce_ready(getattr(server, "port", args.port), server="gstream.server.serve", **info)

    serve(app, args.host, args.port, ready=_ready, **opts)
else:
    from gevent.pywsgi import WSGIServer

    handler_class = getattr(gstream, "WSGIHandler", None)  # PLUG-IN: gstream's pywsgi handler
    sock = listen(args.host, args.port)
    kw = {"handler_class": handler_class} if handler_class is not None else {}
    announce_ready(sock.getsockname()[1], server="gevent.pywsgi", **info)
    WSGIServer(sock, app, log=None, **kw).serve_forever()
