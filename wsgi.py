"""WSGI entry point: ``gunicorn wsgi:app`` and ``flask --app wsgi``."""

from whistle_web import create_app

app = create_app()
