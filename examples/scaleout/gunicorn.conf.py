# gunicorn settings for the scale-out example: `gunicorn -c gunicorn.conf.py 'app:make_app()'`
import os

bind = os.environ.get("BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WORKERS", "2"))
worker_class = "gevent"  # monkey-patches each worker before the app is imported
worker_connections = 10000
# Not preload_app: each worker builds its own backplane (reader greenlet and
# Redis connections) after the fork.
preload_app = False
graceful_timeout = int(os.environ.get("GRACEFUL_TIMEOUT", "10"))
