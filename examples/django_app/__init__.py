"""A minimal single-settings Django project with blocking views beside SSE and WebSocket endpoints.

Run it::

    gstream serve examples.django_app.wsgi:application --port 8000
    gunicorn -k gevent -w 2 -b 127.0.0.1:8000 examples.django_app.wsgi:application
"""
