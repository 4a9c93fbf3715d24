"""API resources; importing this package registers every endpoint."""

from whistle_web.api.resources import auth, recipients  # noqa: F401
