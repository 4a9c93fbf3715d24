"""KMS envelope encryption (version 2) against a real moto server on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator

import boto3
import pytest

from tests.moto_server import moto_server
from whistle_web import crypto
from whistle_web.channels.kinds import Channel, ProviderKind
from whistle_web.extensions import db
from whistle_web.models import Provider
from whistle_web.tenancy import organization_scope

REGION = "eu-west-1"
LOCAL_KEY = os.urandom(32)
SECRET = b"sk_live_4f9a-very-secret-token"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    with moto_server(REGION) as url:
        yield url


@pytest.fixture
def kms(moto_url: str) -> Iterator[object]:
    client = boto3.client("kms", region_name=REGION, endpoint_url=moto_url)
    yield client
    client.close()


def create_key(kms: object) -> tuple[str, str]:
    metadata = kms.create_key(Description="whistle test")["KeyMetadata"]  # type: ignore[attr-defined]
    return metadata["KeyId"], metadata["Arn"]


@pytest.fixture
def restore_keyring(app) -> Iterator[None]:  # type: ignore[no-untyped-def]
    original = crypto._keyring
    yield
    crypto.configure(original)


def use_kms(moto_url: str, key_id: str = "") -> crypto.Keyring:
    """Configure crypto with the local test key, and KMS for new values when key_id is set."""
    ring = crypto.Keyring(
        LOCAL_KEY,
        kms=crypto.Kms(key_id, region=REGION, endpoint_url=moto_url),
    )
    crypto.configure(ring)
    return ring


def split_v2(sealed: bytes) -> tuple[bytes, bytes, bytes]:
    """(key ref, CiphertextBlob, nonce + ciphertext) of a version 2 value."""
    version, ref, length = struct.unpack_from(">B4sH", sealed)
    assert version == 2
    return ref, sealed[7 : 7 + length], sealed[7 + length :]


def test_seal_and_open_with_kms(moto_url: str, kms, restore_keyring):  # type: ignore[no-untyped-def]
    key_id, _ = create_key(kms)
    use_kms(moto_url, key_id)

    sealed = crypto.encrypt(SECRET)
    assert sealed[0] == crypto.VERSION_KMS
    assert SECRET not in sealed
    assert crypto.decrypt(sealed) == SECRET
    assert crypto.encrypt(SECRET) != sealed  # a fresh data key and nonce each time
    assert not crypto.needs_rewrap(sealed)
    assert crypto.decrypt_json(crypto.encrypt_json({"token": "abc"})) == {"token": "abc"}

    # The stored blob is a real KMS data key under our key.
    _, blob, _ = split_v2(sealed)
    opened = kms.decrypt(CiphertextBlob=blob, EncryptionContext={"purpose": "whistle:secret"})
    assert opened["KeyId"].endswith(key_id)
    assert len(opened["Plaintext"]) == 32
    assert opened["Plaintext"] not in sealed  # the plaintext data key is never stored


def test_rewrap_from_local_to_kms_and_back(moto_url: str, kms, restore_keyring):  # type: ignore[no-untyped-def]
    key_id, _ = create_key(kms)
    use_kms(moto_url)  # KMS known but not sealing: version 1
    local = crypto.encrypt(SECRET)
    assert local[0] == crypto.VERSION_LOCAL
    assert not crypto.needs_rewrap(local)

    use_kms(moto_url, key_id)
    assert crypto.decrypt(local) == SECRET  # version 1 values still open
    assert crypto.needs_rewrap(local)
    wrapped = crypto.rewrap(local)
    assert wrapped[0] == crypto.VERSION_KMS
    assert not crypto.needs_rewrap(wrapped)
    assert crypto.decrypt(wrapped) == SECRET

    use_kms(moto_url)  # KMS switched off again: version 2 values still open
    assert crypto.decrypt(wrapped) == SECRET
    assert crypto.needs_rewrap(wrapped)
    back = crypto.rewrap(wrapped)
    assert back[0] == crypto.VERSION_LOCAL
    assert not crypto.needs_rewrap(back)
    assert crypto.decrypt(back) == SECRET


def test_changing_the_kms_key_needs_rewrap(moto_url: str, kms, restore_keyring):  # type: ignore[no-untyped-def]
    first, _ = create_key(kms)
    second, second_arn = create_key(kms)
    use_kms(moto_url, first)
    sealed = crypto.encrypt(SECRET)

    use_kms(moto_url, second_arn)
    assert crypto.decrypt(sealed) == SECRET  # the blob names the key it was sealed under
    assert crypto.needs_rewrap(sealed)
    rewrapped = crypto.rewrap(sealed)
    assert not crypto.needs_rewrap(rewrapped)
    _, blob, _ = split_v2(rewrapped)
    opened = kms.decrypt(CiphertextBlob=blob, EncryptionContext={"purpose": "whistle:secret"})
    assert opened["KeyId"].endswith(second)


def test_tampering_is_detected(moto_url: str, kms, restore_keyring):  # type: ignore[no-untyped-def]
    key_id, _ = create_key(kms)
    use_kms(moto_url, key_id)
    sealed = crypto.encrypt(SECRET)
    _, blob, _ = split_v2(sealed)

    def flipped(position: int) -> bytes:
        copy = bytearray(sealed)
        copy[position] ^= 1
        return bytes(copy)

    blob_end = 7 + len(blob)
    for position in (
        len(sealed) - 1,  # the ciphertext's tag
        blob_end + 2,  # the nonce
        2,  # the recorded key id (authenticated as associated data)
        blob_end - 1,  # the KMS blob itself: KMS refuses it
    ):
        with pytest.raises(crypto.DecryptionError):
            crypto.decrypt(flipped(position))
    with pytest.raises(crypto.DecryptionError):
        crypto.decrypt(sealed[: blob_end + 20])  # truncated
    with pytest.raises(crypto.DecryptionError, match="not a sealed value"):
        crypto.decrypt(sealed[:5] + b"\xff\xff" + sealed[7:])  # blob length past the end
    with pytest.raises(crypto.DecryptionError, match="not a sealed value"):
        crypto.decrypt(b"\x03" + sealed[1:])


def test_unreachable_kms_is_an_error_not_a_bad_value(restore_keyring):  # type: ignore[no-untyped-def]
    ring = crypto.Keyring(
        LOCAL_KEY,
        kms=crypto.Kms(
            "alias/whistle", region=REGION, endpoint_url=f"http://127.0.0.1:{free_port()}"
        ),
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        crypto.configure(ring)
        with pytest.raises(crypto.KmsError, match="could not generate"):
            crypto.encrypt(SECRET)


def test_keyring_from_config_makes_no_kms_call():
    ring = crypto.keyring_from_config(
        "a-secret-key",
        "",
        kms_key_id="arn:aws:kms:eu-central-1:123456789012:key/1234abcd",
        kms_region="us-east-1",
        kms_endpoint_url="http://127.0.0.1:9",
    )
    assert ring.uses_kms
    assert ring.kms.region == "eu-central-1"  # a key ARN names its region
    assert ring.kms.endpoint_url == "http://127.0.0.1:9"
    assert ring.kms._client is None  # nothing asked yet
    plain = crypto.keyring_from_config("a-secret-key", "")
    assert not plain.uses_kms
    assert plain.kms.region == "us-east-1"
    assert (
        crypto.keyring_from_config(
            "k", "", kms_key_id="alias/x", kms_region="ap-south-1"
        ).kms.region
        == "ap-south-1"
    )


def test_provider_credentials_sealed_with_kms(moto_url: str, kms, restore_keyring, org):  # type: ignore[no-untyped-def]
    key_id, _ = create_key(kms)
    use_kms(moto_url, key_id)
    with organization_scope(org.id):
        provider = Provider(channel=Channel.EMAIL, kind=ProviderKind.SES, name="SES")
        provider.set_credentials({"access_key_id": "AKIA1", "secret_access_key": "shh-123"})
        db.session.add(provider)
        db.session.flush()
        stored = db.session.execute(
            db.select(Provider.credentials_encrypted).where(Provider.id == provider.id)
        ).scalar_one()
    assert stored[0] == crypto.VERSION_KMS
    assert b"shh-123" not in stored
    assert provider.get_credentials() == {"access_key_id": "AKIA1", "secret_access_key": "shh-123"}
