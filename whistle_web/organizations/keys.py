"""Re-encrypt stored secrets under the current master key (key rotation)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select

from whistle_web import crypto
from whistle_web.channels.models import Provider
from whistle_web.extensions import db
from whistle_web.organizations.models import Organization
from whistle_web.tenancy import organization_scope


@dataclass(frozen=True)
class RotationReport:
    providers: int
    widget_secrets: int
    unchanged: int


def rotate_secrets() -> RotationReport:
    """Rewrap every provider credential and widget secret sealed under an older key.

    Works through one organization at a time, committing each, so an interruption loses
    nothing and a second run finishes the job (already rewrapped values are skipped).
    Needs the new key configured as current and the old one among the previous keys.
    """
    providers = secrets = unchanged = 0
    for org in db.session.scalars(select(Organization).order_by(Organization.id)).all():
        if org.widget_secret_encrypted and crypto.needs_rewrap(org.widget_secret_encrypted):
            org.widget_secret_encrypted = crypto.rewrap(org.widget_secret_encrypted)
            secrets += 1
        with organization_scope(org.id):
            for provider in db.session.scalars(select(Provider).order_by(Provider.id)):
                if crypto.needs_rewrap(provider.credentials_encrypted):
                    provider.credentials_encrypted = crypto.rewrap(provider.credentials_encrypted)
                    providers += 1
                else:
                    unchanged += 1
            db.session.commit()
    return RotationReport(providers=providers, widget_secrets=secrets, unchanged=unchanged)
