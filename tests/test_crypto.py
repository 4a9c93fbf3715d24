"""Envelope encryption of stored secrets."""

from __future__ import annotations

import base64
import os

import pytest

from whistle_web import crypto
from whistle_web.channels.kinds import Channel, ProviderKind
from whistle_web.extensions import db
from whistle_web.models import Provider
from whistle_web.tenancy import organization_scope


@pytest.fixture
def keyring(app):
    """Swap in a known keyring for the test and restore the app's afterwards."""
    original = crypto._keyring
    yield
    crypto.configure(original)


def test_roundtrip_and_fresh_randomness(app):
    first = crypto.encrypt_json({"password": "hunter2"})
    second = crypto.encrypt_json({"password": "hunter2"})
    assert first != second  # a new data key and nonce every time
    assert b"hunter2" not in first
    assert crypto.decrypt_json(first) == {"password": "hunter2"}


def test_tampering_is_detected(app):
    sealed = bytearray(crypto.encrypt(b"secret"))
    sealed[-1] ^= 1
    with pytest.raises(crypto.DecryptionError):
        crypto.decrypt(bytes(sealed))
    with pytest.raises(crypto.DecryptionError):
        crypto.decrypt(b"not sealed at all")


def test_rotation_keeps_old_values_readable(keyring):
    old_key, new_key = os.urandom(32), os.urandom(32)
    crypto.configure(crypto.Keyring(old_key))
    sealed = crypto.encrypt(b"api-token")
    crypto.configure(crypto.Keyring(new_key, [old_key]))
    assert crypto.decrypt(sealed) == b"api-token"
    assert crypto.needs_rewrap(sealed)
    rewrapped = crypto.encrypt(crypto.decrypt(sealed))
    assert not crypto.needs_rewrap(rewrapped)
    crypto.configure(crypto.Keyring(new_key))
    assert crypto.decrypt(rewrapped) == b"api-token"
    with pytest.raises(crypto.DecryptionError, match="unknown master key"):
        crypto.decrypt(sealed)


def test_configured_key_is_base64_of_32_bytes():
    key = base64.b64encode(os.urandom(32)).decode()
    ring = crypto.keyring_from_config("ignored", key)
    assert ring.current == base64.b64decode(key)
    with pytest.raises(ValueError, match="32 bytes"):
        crypto.Keyring(b"short")


def test_provider_credentials_are_stored_encrypted(org):
    with organization_scope(org.id):
        provider = Provider(channel=Channel.SMS, kind=ProviderKind.TWILIO, name="Twilio")
        provider.set_credentials({"account_sid": "AC123", "auth_token": "tok-456"})
        db.session.add(provider)
        db.session.flush()
        stored = db.session.execute(
            db.select(Provider.credentials_encrypted).where(Provider.id == provider.id)
        ).scalar_one()
    assert b"tok-456" not in stored
    assert provider.get_credentials() == {"account_sid": "AC123", "auth_token": "tok-456"}
