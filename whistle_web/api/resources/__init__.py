"""API resources; importing this package registers every endpoint."""

from whistle_web.api.resources import (  # noqa: F401
    audiences,
    auth,
    campaigns,
    inbox,
    preferences,
    recipients,
    sending,
    settings,
    templates,
)
