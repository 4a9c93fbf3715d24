"""API resources; importing this package registers every endpoint."""

from whistle_web.api.resources import (  # noqa: F401
    audiences,
    auth,
    campaigns,
    preferences,
    recipients,
    sending,
    settings,
    templates,
)
