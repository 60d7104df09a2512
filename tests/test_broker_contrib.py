"""The broker inside real Flask and Django applications served by pywsgi."""

import gevent
import pytest

from gstream import Event
from gstream.broker import SSEBroker
from tests.helpers import SSEStream, wait_until


def check_stream(broker, srv, path):
    s = SSEStream(srv.port, path, {"Last-Event-ID": ""})
    assert s.status == 200 and s.headers["content-type"].startswith("text/event-stream")
    assert s.headers.get("x-accel-buffering") == "no"
    # Headers and the opening comment arrive before any event.
    assert s.reader.read_chunk().startswith(b": stream open")
    assert wait_until(lambda: broker.subscriber_count == 1, 3)
    assert broker.subscribers()[0]["buffer"] == 7
    for i in range(3):
        broker.publish(Event(data=str(i), name="tick"))
        assert s.next_event().data == str(i)  # each event flushed at once
    s.close()
    # The framework closes the body when the client is gone: unregistered.
    assert wait_until(lambda: broker.publish("x") and broker.subscriber_count == 0, 3)


def test_flask_view(serve):
    flask = pytest.importorskip("flask")
    from gstream.contrib.flask import flask_response

    broker = SSEBroker(max_subscribers=1, retry_after=3)
    app = flask.Flask(__name__)

    @app.get("/events")
    def events():
        return flask_response(broker)

    srv = serve(app)
    check_stream(broker, srv, "/events?buffer=7")
    hold = SSEStream(srv.port, "/events")
    assert wait_until(lambda: broker.subscriber_count == 1, 3)
    refused = SSEStream(srv.port, "/events")
    assert refused.status == 503 and refused.headers["retry-after"] == "3"
    hold.close()
    refused.close()


def test_django_view(serve):
    pytest.importorskip("django")
    from django.conf import settings

    if not settings.configured:
        settings.configure(DEBUG=False, SECRET_KEY="test", ALLOWED_HOSTS=["*"],
                           ROOT_URLCONF=__name__, MIDDLEWARE=[], INSTALLED_APPS=[])
    import django
    from django.core.wsgi import get_wsgi_application
    from django.test.utils import override_settings
    from django.urls import path

    from gstream.contrib.django import django_response

    broker = SSEBroker(max_subscribers=1)

    def events(request):
        return django_response(broker, request)

    global urlpatterns
    urlpatterns = [path("events", events)]
    django.setup()
    with override_settings(ROOT_URLCONF=__name__, ALLOWED_HOSTS=["*"], MIDDLEWARE=[]):
        srv = serve(get_wsgi_application())
        check_stream(broker, srv, "/events?buffer=7")
        hold = SSEStream(srv.port, "/events")
        assert wait_until(lambda: broker.subscriber_count == 1, 3)
        refused = SSEStream(srv.port, "/events")
        assert refused.status == 503 and refused.headers["retry-after"] == "5"
        hold.close()
        refused.close()
        gevent.sleep(0)


urlpatterns: list = []
