"""Envelope encryption for secrets stored in the database (provider credentials).

Each value gets its own random data key; the value is sealed with AES-256-GCM under the data
key, and the data key is sealed under the master key. The master key comes from
``WHISTLE_ENCRYPTION_KEY`` (base64 of 32 bytes) or is derived from ``SECRET_KEY`` with HKDF.
Older master keys may be listed for decryption so keys can be rotated by re-encrypting.

Layout (version 1):
``0x01 | key id (4) | dk nonce (12) | sealed dk (48) | nonce (12) | ciphertext``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

VERSION_LOCAL = 1
_AAD_DATA = b"whistle:secret:v1"
_AAD_KEY = b"whistle:data-key:v1"
_HEADER = struct.Struct(">B4s12s48s12s")


class DecryptionError(ValueError):
    """Raised when a sealed value cannot be opened (wrong key, tampered bytes)."""


class Keyring:
    """The master key in use, and older ones still accepted for decryption."""

    def __init__(self, current: bytes, previous: list[bytes] | None = None) -> None:
        for key in [current, *(previous or [])]:
            if len(key) != 32:
                raise ValueError("master keys must be 32 bytes")
        self.current = current
        self._by_id = {key_id(k): k for k in [current, *(previous or [])]}

    def lookup(self, kid: bytes) -> bytes:
        try:
            return self._by_id[kid]
        except KeyError:
            raise DecryptionError("sealed with an unknown master key") from None


def key_id(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()[:4]


def derive_key(secret: str) -> bytes:
    """Derive a 32-byte master key from the application's SECRET_KEY."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"whistle", info=b"credentials").derive(
        secret.encode()
    )


def keyring_from_config(secret_key: str, encryption_key: str, previous: str = "") -> Keyring:
    current = base64.b64decode(encryption_key) if encryption_key else derive_key(secret_key)
    older = [base64.b64decode(k) for k in previous.split(",") if k.strip()]
    return Keyring(current, older)


_keyring: Keyring | None = None


def configure(keyring: Keyring) -> None:
    global _keyring
    _keyring = keyring


def _ring() -> Keyring:
    if _keyring is None:
        raise RuntimeError("crypto is not configured; create_app() configures it")
    return _keyring


def encrypt(plaintext: bytes) -> bytes:
    ring = _ring()
    data_key = AESGCM.generate_key(bit_length=256)
    dk_nonce, nonce = os.urandom(12), os.urandom(12)
    sealed_key = AESGCM(ring.current).encrypt(dk_nonce, data_key, _AAD_KEY)
    ciphertext = AESGCM(data_key).encrypt(nonce, plaintext, _AAD_DATA)
    header = _HEADER.pack(VERSION_LOCAL, key_id(ring.current), dk_nonce, sealed_key, nonce)
    return header + ciphertext


def decrypt(sealed: bytes) -> bytes:
    if len(sealed) < _HEADER.size or sealed[0] != VERSION_LOCAL:
        raise DecryptionError("not a sealed value")
    _, kid, dk_nonce, sealed_key, nonce = _HEADER.unpack_from(sealed)
    master = _ring().lookup(kid)
    try:
        data_key = AESGCM(master).decrypt(dk_nonce, sealed_key, _AAD_KEY)
        return AESGCM(data_key).decrypt(nonce, sealed[_HEADER.size :], _AAD_DATA)
    except Exception as exc:  # cryptography raises InvalidTag without detail
        raise DecryptionError("sealed value failed authentication") from exc


def encrypt_json(value: dict[str, Any]) -> bytes:
    return encrypt(json.dumps(value, separators=(",", ":"), sort_keys=True).encode())


def decrypt_json(sealed: bytes) -> dict[str, Any]:
    return json.loads(decrypt(bytes(sealed)))


def needs_rewrap(sealed: bytes) -> bool:
    """True when the value is sealed under an older master key."""
    return bytes(sealed[1:5]) != key_id(_ring().current)
