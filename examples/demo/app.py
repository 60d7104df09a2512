"""The demo as a WSGI app object, for servers that want ``module:app``.

    gstream demo                                  # the usual way
    gstream serve examples.demo.app:app           # the same app, any gstream server options
    gunicorn -k gstream.contrib.gunicorn.GeventWorker -w 1 examples.demo.app:app

The code is in ``gstream/demo/`` (app.py, chat.py, static/).
"""

from __future__ import annotations

from gstream.demo import make_app

app = make_app()
