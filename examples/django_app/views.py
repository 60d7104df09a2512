"""Ordinary blocking Django views beside an SSE endpoint.

``time.sleep``, the database and ``requests`` block only the current
greenlet under gevent's monkey-patching (``gstream serve`` and gunicorn's
gevent worker apply it before Django is imported).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import requests
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from gstream import SSEBroker
from gstream.contrib.django import django_response

news = SSEBroker(topic="news", heartbeat_interval=15.0)

_SCHEMA = "CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, name TEXT NOT NULL)"


def _cursor() -> Any:
    cur = connection.cursor()
    cur.execute(_SCHEMA)  # cheap, and no migration step for a one-table example
    return cur


@require_GET
def healthz(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok\n", content_type="text/plain; charset=utf-8")


@require_GET
def sleep(request: HttpRequest) -> HttpResponse:
    try:
        seconds = min(max(float(request.GET.get("seconds", "0.1")), 0.0), 2.0)
    except ValueError:
        return JsonResponse({"error": "seconds must be a number"}, status=400)
    time.sleep(seconds)  # blocks this greenlet only (monkey-patched)
    return JsonResponse({"slept": seconds})


@require_http_methods(["GET", "POST"])
def items(request: HttpRequest) -> HttpResponse:
    if request.method == "POST":
        try:
            payload = json.loads(request.body or b"{}")
        except ValueError:
            payload = None
        name = payload.get("name") if isinstance(payload, dict) else None
        if not isinstance(name, str) or not 0 < len(name.strip()) <= 100:
            return JsonResponse({"error": "name: 1 to 100 characters"}, status=400)
        with _cursor() as cur:
            cur.execute("INSERT INTO items (name) VALUES (%s)", [name.strip()])
            return JsonResponse({"id": cur.lastrowid, "name": name.strip()}, status=201)
    with _cursor() as cur:
        cur.execute("SELECT id, name FROM items ORDER BY id")
        rows = cur.fetchall()
    return JsonResponse({"items": [{"id": i, "name": n} for i, n in rows]})


@require_GET
def fetch(request: HttpRequest) -> HttpResponse:
    # A fixed upstream (never a URL from the request: no open proxy).
    upstream = os.environ.get("EXAMPLE_UPSTREAM") or request.build_absolute_uri("/healthz")
    started = time.perf_counter()
    try:
        r = requests.get(upstream, timeout=5)
    except requests.RequestException as exc:
        return JsonResponse({"error": f"upstream failed: {type(exc).__name__}"}, status=502)
    return JsonResponse({"status": r.status_code, "body": r.text[:200],
                         "ms": round((time.perf_counter() - started) * 1000, 1)})


def events(request: HttpRequest) -> HttpResponse:
    return django_response(news, request)


@require_POST
def publish(request: HttpRequest) -> HttpResponse:
    text = request.body.decode("utf-8", "replace")[:4096]
    # The id, or None (null) when it is not known yet: on a Redis backplane
    # publish() does not wait for Redis to number the event unless asked to
    # (wait_for_id=0.05); an in-memory broker always knows it.
    return JsonResponse({"id": news.publish(text)})
