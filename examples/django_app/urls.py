"""URL routes (the WebSocket endpoint is routed in wsgi.py, before Django)."""

from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("healthz", views.healthz),
    path("sleep", views.sleep),
    path("items", views.items),
    path("fetch", views.fetch),
    path("events", views.events),
    path("publish", views.publish),
]
