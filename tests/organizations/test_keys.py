"""``whistle rotate-keys`` re-encrypts secrets under the new master key."""

from __future__ import annotations

import os

import pytest

from whistle_web import crypto
from whistle_web.channels.kinds import Channel, ProviderKind
from whistle_web.extensions import db
from whistle_web.models import Organization, Provider
from whistle_web.tenancy import organization_scope


@pytest.fixture
def restore_keyring():
    original = crypto._keyring
    yield
    crypto.configure(original)


def test_rotation_rewraps_provider_credentials_and_widget_secrets(
    org, other_org, runner, restore_keyring
):
    old, new = os.urandom(32), os.urandom(32)
    crypto.configure(crypto.Keyring(old))
    for organization in (org, other_org):
        organization.widget_secret_encrypted = crypto.encrypt(b"widget-secret")
        with organization_scope(organization.id):
            provider = Provider(channel=Channel.SMS, kind=ProviderKind.TWILIO, name="Twilio")
            provider.set_credentials({"auth_token": f"token-{organization.id}"})
            db.session.add(provider)
            db.session.flush()
    db.session.commit()

    crypto.configure(crypto.Keyring(new, [old]))
    result = runner.invoke(args=["whistle", "rotate-keys"])
    assert result.exit_code == 0, result.output
    assert "Re-encrypted 2 provider credentials and 2 widget secrets" in result.output

    crypto.configure(crypto.Keyring(new))  # the old key is gone now
    db.session.expire_all()
    for organization in (org, other_org):
        assert (
            crypto.decrypt(db.session.get(Organization, organization.id).widget_secret_encrypted)
            == b"widget-secret"
        )
        with organization_scope(organization.id):
            provider = db.session.scalar(db.select(Provider))
            assert provider.get_credentials() == {"auth_token": f"token-{organization.id}"}

    again = runner.invoke(args=["whistle", "rotate-keys"])
    assert "Re-encrypted 0 provider credentials" in again.output
