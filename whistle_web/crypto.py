"""Envelope encryption for secrets stored in the database (provider credentials).

Each value gets its own random data key; the value is sealed with AES-256-GCM under the data
key, and the data key is sealed under a master key, one of:

* version 1, a local master key: ``WHISTLE_ENCRYPTION_KEY`` (base64 of 32 bytes) or derived
  from ``SECRET_KEY`` with HKDF. Older master keys may be listed for decryption so keys can
  be rotated by re-encrypting.
* version 2, AWS KMS (when ``WHISTLE_KMS_KEY_ID`` is set): KMS generates the data key and
  returns it sealed (``CiphertextBlob``); the plaintext data key is used once and dropped.
  Opening a value calls ``kms.decrypt``.

Both versions stay readable whichever one seals new values, so switching to (or away from)
KMS is: change the configuration, then :func:`rewrap` every stored value.

Layouts:

* version 1: ``0x01 | key id (4) | dk nonce (12) | sealed dk (48) | nonce (12) | ciphertext``
* version 2: ``0x02 | key id (4) | blob length (2) | CiphertextBlob | nonce (12) |
  ciphertext``, where the key id is a hash of the configured KMS key id (so
  :func:`needs_rewrap` can tell, without calling KMS, that the configured key changed).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import struct
import threading
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

VERSION_LOCAL = 1
VERSION_KMS = 2
_AAD_DATA = b"whistle:secret:v1"
_AAD_KEY = b"whistle:data-key:v1"
_HEADER = struct.Struct(">B4s12s48s12s")
_AAD_DATA_KMS = b"whistle:secret:v2"
_KMS_HEADER = struct.Struct(">B4sH")  # version, key id, length of the CiphertextBlob
_NONCE = 12
# Bound to every KMS data key: a blob only opens for this purpose (and shows up in CloudTrail).
_KMS_CONTEXT = {"purpose": "whistle:secret"}
_ARN_REGION = re.compile(r"^arn:aws[\w-]*:kms:([a-z0-9-]+):")


class DecryptionError(ValueError):
    """Raised when a sealed value cannot be opened (wrong key, tampered bytes)."""


class KmsError(RuntimeError):
    """KMS could not be asked (unreachable, access denied): not a problem with the value."""


class Kms:
    """An AWS KMS client (made on first use) and the key that seals new values.

    With an empty ``key_id`` nothing new is sealed with KMS, but values sealed earlier still
    open (the blob names its key), which is what moving away from KMS needs.
    """

    def __init__(
        self,
        key_id: str = "",
        *,
        region: str = "",
        endpoint_url: str = "",
        client: Any = None,
    ) -> None:
        self.key_id = key_id.strip()
        # A key ARN names its region; otherwise the configured one.
        match = _ARN_REGION.match(self.key_id)
        self.region = (match.group(1) if match else region) or "us-east-1"
        self.endpoint_url = endpoint_url or None
        self._client = client
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    import boto3
                    from botocore.config import Config

                    # The default credential chain: environment, instance or task role.
                    self._client = boto3.session.Session().client(
                        "kms",
                        region_name=self.region,
                        endpoint_url=self.endpoint_url,
                        config=Config(
                            connect_timeout=5,
                            read_timeout=10,
                            retries={"mode": "standard", "max_attempts": 3},
                        ),
                    )
        return self._client

    def generate_data_key(self) -> tuple[bytes, bytes]:
        """A fresh AES-256 key: (plaintext, CiphertextBlob)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = self.client.generate_data_key(
                KeyId=self.key_id, KeySpec="AES_256", EncryptionContext=_KMS_CONTEXT
            )
        except (ClientError, BotoCoreError) as exc:
            raise KmsError(f"KMS could not generate a data key: {exc}") from exc
        return response["Plaintext"], response["CiphertextBlob"]

    def decrypt_data_key(self, blob: bytes) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = self.client.decrypt(CiphertextBlob=blob, EncryptionContext=_KMS_CONTEXT)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("InvalidCiphertextException", "IncorrectKeyException"):
                raise DecryptionError("sealed value failed authentication") from None
            raise KmsError(f"KMS could not open a data key: {exc}") from exc
        except BotoCoreError as exc:
            raise KmsError(f"KMS could not open a data key: {exc}") from exc
        return response["Plaintext"]


class Keyring:
    """The master key in use, older ones still accepted for decryption, and KMS.

    When ``kms`` has a key id, new values are sealed with KMS (version 2); the local keys
    keep opening version 1 values either way.
    """

    def __init__(
        self, current: bytes, previous: list[bytes] | None = None, *, kms: Kms | None = None
    ) -> None:
        for key in [current, *(previous or [])]:
            if len(key) != 32:
                raise ValueError("master keys must be 32 bytes")
        self.current = current
        self._by_id = {key_id(k): k for k in [current, *(previous or [])]}
        self.kms = kms or Kms()

    @property
    def uses_kms(self) -> bool:
        return bool(self.kms.key_id)

    def lookup(self, kid: bytes) -> bytes:
        try:
            return self._by_id[kid]
        except KeyError:
            raise DecryptionError("sealed with an unknown master key") from None


def key_id(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()[:4]


def kms_key_ref(kms_key_id: str) -> bytes:
    """The 4 bytes recorded in a version 2 value for the KMS key id it was sealed under."""
    return hashlib.sha256(b"kms:" + kms_key_id.encode()).digest()[:4]


def derive_key(secret: str) -> bytes:
    """Derive a 32-byte master key from the application's SECRET_KEY."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"whistle", info=b"credentials").derive(
        secret.encode()
    )


def keyring_from_config(
    secret_key: str,
    encryption_key: str,
    previous: str = "",
    *,
    kms_key_id: str = "",
    kms_region: str = "",
    kms_endpoint_url: str = "",
) -> Keyring:
    """The keyring from configuration; no KMS call is made until a value needs one."""
    current = base64.b64decode(encryption_key) if encryption_key else derive_key(secret_key)
    older = [base64.b64decode(k) for k in previous.split(",") if k.strip()]
    kms = Kms(kms_key_id or "", region=kms_region or "", endpoint_url=kms_endpoint_url or "")
    return Keyring(current, older, kms=kms)


_keyring: Keyring | None = None


def configure(keyring: Keyring) -> None:
    global _keyring
    _keyring = keyring


def _ring() -> Keyring:
    if _keyring is None:
        raise RuntimeError("crypto is not configured; create_app() configures it")
    return _keyring


def encrypt(plaintext: bytes) -> bytes:
    """Seal a value under the current method: KMS when configured, else the master key."""
    ring = _ring()
    if ring.uses_kms:
        return _encrypt_kms(ring.kms, plaintext)
    return _encrypt_local(ring, plaintext)


def _encrypt_local(ring: Keyring, plaintext: bytes) -> bytes:
    data_key = AESGCM.generate_key(bit_length=256)
    dk_nonce, nonce = os.urandom(_NONCE), os.urandom(_NONCE)
    sealed_key = AESGCM(ring.current).encrypt(dk_nonce, data_key, _AAD_KEY)
    ciphertext = AESGCM(data_key).encrypt(nonce, plaintext, _AAD_DATA)
    header = _HEADER.pack(VERSION_LOCAL, key_id(ring.current), dk_nonce, sealed_key, nonce)
    return header + ciphertext


def _encrypt_kms(kms: Kms, plaintext: bytes) -> bytes:
    data_key, blob = kms.generate_data_key()
    if len(blob) > 0xFFFF:
        raise KmsError("KMS returned an oversized data key blob")
    header = _KMS_HEADER.pack(VERSION_KMS, kms_key_ref(kms.key_id), len(blob)) + blob
    nonce = os.urandom(_NONCE)
    # The header (key id, blob) is authenticated with the value: no swapping blobs around.
    ciphertext = AESGCM(data_key).encrypt(nonce, plaintext, _AAD_DATA_KMS + header)
    del data_key  # the plaintext data key is not kept anywhere
    return header + nonce + ciphertext


def decrypt(sealed: bytes) -> bytes:
    """Open a value sealed by either version.

    Raises:
        DecryptionError: not a sealed value, an unknown key, or tampered bytes.
        KmsError: a version 2 value, and KMS could not be asked.
    """
    sealed = bytes(sealed)
    version = sealed[0] if sealed else None
    if version == VERSION_LOCAL and len(sealed) >= _HEADER.size:
        return _decrypt_local(sealed)
    if version == VERSION_KMS and len(sealed) >= _KMS_HEADER.size:
        return _decrypt_kms(sealed)
    raise DecryptionError("not a sealed value")


def _decrypt_local(sealed: bytes) -> bytes:
    _, kid, dk_nonce, sealed_key, nonce = _HEADER.unpack_from(sealed)
    master = _ring().lookup(kid)
    try:
        data_key = AESGCM(master).decrypt(dk_nonce, sealed_key, _AAD_KEY)
        return AESGCM(data_key).decrypt(nonce, sealed[_HEADER.size :], _AAD_DATA)
    except Exception as exc:  # cryptography raises InvalidTag without detail
        raise DecryptionError("sealed value failed authentication") from exc


def _decrypt_kms(sealed: bytes) -> bytes:
    _, _, blob_length = _KMS_HEADER.unpack_from(sealed)
    header_end = _KMS_HEADER.size + blob_length
    if blob_length == 0 or len(sealed) < header_end + _NONCE + 16:
        raise DecryptionError("not a sealed value")
    header, blob = sealed[:header_end], sealed[_KMS_HEADER.size : header_end]
    nonce = sealed[header_end : header_end + _NONCE]
    # The blob names its KMS key, so values sealed under an earlier key id still open.
    data_key = _ring().kms.decrypt_data_key(blob)
    try:
        return AESGCM(data_key).decrypt(
            nonce, sealed[header_end + _NONCE :], _AAD_DATA_KMS + header
        )
    except Exception as exc:
        raise DecryptionError("sealed value failed authentication") from exc


def encrypt_json(value: dict[str, Any]) -> bytes:
    return encrypt(json.dumps(value, separators=(",", ":"), sort_keys=True).encode())


def decrypt_json(sealed: bytes) -> dict[str, Any]:
    return json.loads(decrypt(bytes(sealed)))


def needs_rewrap(sealed: bytes) -> bool:
    """True when the value is not sealed the way new values are.

    That is: a version 1 value while KMS is configured, a version 2 value under another
    configured KMS key id (or while KMS is no longer configured), or a version 1 value under
    an older master key. A KMS key id that stays the same while its alias is repointed is
    not noticed here (KMS keeps such values readable).
    """
    ring = _ring()
    sealed = bytes(sealed)
    if ring.uses_kms:
        return sealed[:1] != bytes([VERSION_KMS]) or sealed[1:5] != kms_key_ref(ring.kms.key_id)
    return sealed[:1] != bytes([VERSION_LOCAL]) or sealed[1:5] != key_id(ring.current)


def rewrap(sealed: bytes) -> bytes:
    """Open a value with whatever sealed it and seal it again the current way."""
    return encrypt(decrypt(sealed))
