"""Runnable examples (a package so that ``gstream serve examples.flask_app.app:app`` imports them)."""
