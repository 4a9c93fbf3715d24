"""Password hashing and API key secrets."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

API_KEY_PREFIX = "whk_"
_PREFIX_RANDOM_LEN = 10
PREFIX_LENGTH = len(API_KEY_PREFIX) + _PREFIX_RANDOM_LEN

_hasher = PasswordHasher()
# Verifying against this keeps sign-in time the same whether or not the email exists.
_DUMMY_HASH = _hasher.hash("whistle-timing-equaliser")


def configure_password_hasher(*, fast: bool) -> None:
    """Use cheap argon2 parameters (tests only) or the library's secure defaults."""
    global _hasher, _DUMMY_HASH
    _hasher = (
        PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1) if fast else PasswordHasher()
    )
    _DUMMY_HASH = _hasher.hash("whistle-timing-equaliser")


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """Check a password in constant-ish time; a missing hash still costs one verification."""
    try:
        return _hasher.verify(password_hash or _DUMMY_HASH, password) and password_hash is not None
    except (VerificationError, InvalidHashError):
        return False


def new_api_key() -> tuple[str, str, str]:
    """Make a new API key.

    Returns:
        (prefix, full secret shown once, hash to store)
    """
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    prefix = API_KEY_PREFIX + "".join(secrets.choice(alphabet) for _ in range(_PREFIX_RANDOM_LEN))
    token = f"{prefix}_{secrets.token_urlsafe(32)}"
    return prefix, token, hash_api_key(token)


def hash_api_key(token: str) -> str:
    # The secret has 256 bits of entropy, so one SHA-256 is enough and keeps look-ups fast.
    return hashlib.sha256(token.encode()).hexdigest()


def split_api_key(token: str) -> str | None:
    """Return the public prefix of a well-formed key, else None."""
    if (
        len(token) > PREFIX_LENGTH + 1
        and token.startswith(API_KEY_PREFIX)
        and token[PREFIX_LENGTH] == "_"
    ):
        return token[:PREFIX_LENGTH]
    return None


def api_key_matches(token: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_api_key(token), stored_hash)
