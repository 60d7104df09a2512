"""The example's only settings module (no apps, no templates: views and a database)."""

from __future__ import annotations

import os
import tempfile

DEBUG = False
# A development key; set DJANGO_SECRET_KEY for anything real.
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "gstream-example-not-secret")
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]
ROOT_URLCONF = "examples.django_app.urls"
INSTALLED_APPS: list[str] = []
MIDDLEWARE = ["django.middleware.common.CommonMiddleware"]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("EXAMPLE_DB")
        or os.path.join(tempfile.gettempdir(), "gstream-django-example.sqlite3"),
        # Django keeps one connection per thread; under gevent that is per
        # greenlet, closed at the end of each request (CONN_MAX_AGE=0).
        "CONN_MAX_AGE": 0,
        "OPTIONS": {"timeout": 5},
    }
}
DATA_UPLOAD_MAX_MEMORY_SIZE = 64 * 1024  # bodies past this get 400
USE_TZ = True
APPEND_SLASH = False
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
}
