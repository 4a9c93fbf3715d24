"""Signed tracking links: click redirects, the open pixel, unsubscribe and preference pages.

No Flask here: callers pass the signing secret (the app's ``SECRET_KEY``) and the public base
URL (``WHISTLE_BASE_URL``), so the send pipeline, workers and tests build the same links.

A token is ``<payload>.<mac>``: the payload is compact JSON in unpadded URL-safe base64, the
mac is HMAC-SHA256 truncated to 128 bits under a key derived per purpose, so a click token
never verifies as an open or unsubscribe token. Every payload starts with the organization
id: the views scope their queries to it and trust nothing else from the request. Tokens do
not expire (an unsubscribe link in a year-old email must still work).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import html as html_lib
import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

CLICK = "click"
OPEN = "open"
UNSUBSCRIBE = "unsubscribe"
PREFERENCES = "preferences"
PURPOSES = (CLICK, OPEN, UNSUBSCRIBE, PREFERENCES)

MAC_BYTES = 16
# Far above any real link; refuses absurd input before decoding it.
MAX_TOKEN_LENGTH = 8192
_TOKEN_CHARS = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class LinkPayload:
    """What a verified token says; only ever built from a valid signature."""

    purpose: str
    organization_id: int
    delivery_id: int | None = None
    recipient_id: int | None = None
    url: str | None = None


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _key(secret: str | bytes, purpose: str) -> bytes:
    if purpose not in PURPOSES:
        raise ValueError(f"unknown link purpose {purpose!r}")
    raw = secret.encode() if isinstance(secret, str) else secret
    return hmac.new(raw, f"whistle.tracking.{purpose}".encode(), hashlib.sha256).digest()


def _mac(secret: str | bytes, purpose: str, body: str) -> bytes:
    return hmac.new(_key(secret, purpose), body.encode("ascii"), hashlib.sha256).digest()[
        :MAC_BYTES
    ]


def sign(secret: str | bytes, purpose: str, payload: list[Any]) -> str:
    """Sign a JSON-able list for one purpose; the URL-safe token has no padding."""
    body = _b64encode(json.dumps(payload, separators=(",", ":")).encode())
    return f"{body}.{_b64encode(_mac(secret, purpose, body))}"


def _unsign(secret: str | bytes, purpose: str, token: str) -> list[Any] | None:
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:
        return None
    if not _TOKEN_CHARS.match(token):
        return None
    body, mac = token.split(".")
    # Compare the text, not the decoded bytes: base64's spare low bits would otherwise let
    # several spellings of one mac verify.
    expected = _b64encode(_mac(secret, purpose, body))
    if not hmac.compare_digest(mac.encode("ascii"), expected.encode("ascii")):
        return None
    try:
        payload = json.loads(_b64decode(body))
    except (binascii.Error, ValueError):
        return None
    return payload if isinstance(payload, list) else None


def _is_id(value: Any) -> bool:
    return type(value) is int and value > 0


def is_trackable_url(url: str) -> bool:
    """An absolute http(s) URL with a host and no control characters."""
    if not isinstance(url, str) or _CONTROL_CHARS.search(url):
        return False
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.hostname)


def verify(token: str, purpose: str, *, secret: str | bytes) -> LinkPayload | None:
    """Return the payload of a valid token of ``purpose``, or None (tampered, wrong purpose)."""
    payload = _unsign(secret, purpose, token)
    if payload is None:
        return None
    if purpose == CLICK:
        if len(payload) != 3 or not (_is_id(payload[0]) and _is_id(payload[1])):
            return None
        if not is_trackable_url(payload[2]):
            return None
        return LinkPayload(CLICK, payload[0], delivery_id=payload[1], url=payload[2])
    if purpose == OPEN:
        if len(payload) != 2 or not (_is_id(payload[0]) and _is_id(payload[1])):
            return None
        return LinkPayload(OPEN, payload[0], delivery_id=payload[1])
    if purpose == PREFERENCES:
        if len(payload) != 2 or not (_is_id(payload[0]) and _is_id(payload[1])):
            return None
        return LinkPayload(PREFERENCES, payload[0], recipient_id=payload[1])
    # UNSUBSCRIBE
    if len(payload) != 3 or not (_is_id(payload[0]) and _is_id(payload[1])):
        return None
    if payload[2] is not None and not _is_id(payload[2]):
        return None
    return LinkPayload(UNSUBSCRIBE, payload[0], delivery_id=payload[2], recipient_id=payload[1])


def verify_click(token: str, *, secret: str | bytes) -> LinkPayload | None:
    return verify(token, CLICK, secret=secret)


def verify_open(token: str, *, secret: str | bytes) -> LinkPayload | None:
    return verify(token, OPEN, secret=secret)


def verify_unsubscribe(token: str, *, secret: str | bytes) -> LinkPayload | None:
    return verify(token, UNSUBSCRIBE, secret=secret)


def verify_preferences(token: str, *, secret: str | bytes) -> LinkPayload | None:
    return verify(token, PREFERENCES, secret=secret)


def _organization(organization_id: int | None, delivery_id: int) -> int:
    """The explicit organization id, else the active ``organization_scope``."""
    if organization_id is None:
        # Imported here: links stay usable without an app; tenancy is a plain context variable.
        from whistle_web.tenancy import current_organization_id

        organization_id = current_organization_id()
        if organization_id is None:
            raise ValueError("pass organization_id or call inside organization_scope()")
    if not (_is_id(delivery_id) and _is_id(organization_id)):
        raise ValueError("organization and delivery ids must be positive integers")
    return organization_id


def click_url(
    base_url: str,
    secret: str | bytes,
    delivery_id: int,
    target_url: str,
    *,
    organization_id: int | None = None,
) -> str:
    """The tracked link that records a click and redirects to ``target_url``.

    ``organization_id`` defaults to the active organization scope.

    Raises:
        ValueError: the target is not an absolute http(s) URL, or no organization is known.
    """
    organization_id = _organization(organization_id, delivery_id)
    target = target_url.strip() if isinstance(target_url, str) else target_url
    if not is_trackable_url(target):
        raise ValueError("only absolute http and https URLs can be tracked")
    token = sign(secret, CLICK, [organization_id, delivery_id, target])
    return f"{base_url.rstrip('/')}/t/c/{token}"


def open_pixel_url(
    base_url: str, secret: str | bytes, delivery_id: int, *, organization_id: int | None = None
) -> str:
    """The 1×1 image that records an open (organization: explicit or the active scope)."""
    organization_id = _organization(organization_id, delivery_id)
    token = sign(secret, OPEN, [organization_id, delivery_id])
    return f"{base_url.rstrip('/')}/t/o/{token}.gif"


def unsubscribe_url(
    base_url: str,
    secret: str | bytes,
    organization_id: int,
    recipient_id: int,
    delivery_id: int | None = None,
) -> str:
    """The unsubscribe page (and RFC 8058 one-click target) of one recipient."""
    if not (_is_id(organization_id) and _is_id(recipient_id)):
        raise ValueError("organization and recipient ids must be positive integers")
    if delivery_id is not None and not _is_id(delivery_id):
        raise ValueError("the delivery id must be a positive integer")
    token = sign(secret, UNSUBSCRIBE, [organization_id, recipient_id, delivery_id])
    return f"{base_url.rstrip('/')}/t/u/{token}"


def preferences_url(
    base_url: str, secret: str | bytes, organization_id: int, recipient_id: int
) -> str:
    """The hosted preference page of one recipient (linked from emails and the widget)."""
    if not (_is_id(organization_id) and _is_id(recipient_id)):
        raise ValueError("organization and recipient ids must be positive integers")
    token = sign(secret, PREFERENCES, [organization_id, recipient_id])
    return f"{base_url.rstrip('/')}/p/{token}"


# An <a ...> start tag; quoted attribute values may contain ">".
_A_TAG = re.compile(r"""<a(?=[\s/>])(?:[^>"']|"[^"]*"|'[^']*')*>""", re.IGNORECASE)
# One attribute: name, then an optional double-quoted, single-quoted or bare value.
_ATTRIBUTE = re.compile(r"""([^\s"'<>/=]+)(?:\s*=\s*("[^"]*"|'[^']*'|[^\s"'=<>`]+))?""")
_BODY_END = re.compile(r"</body\s*>", re.IGNORECASE)


def rewrite_html(
    html: str,
    *,
    base_url: str,
    secret: str | bytes,
    delivery_id: int,
    organization_id: int | None = None,
) -> str:
    """Route every http(s) link through its click URL and add the open pixel.

    ``mailto:``, ``tel:``, in-page anchors and Whistle's own links (the unsubscribe and
    preference pages, links already tracked) are left alone; other attributes and the
    quoting are kept.
    """
    organization_id = _organization(organization_id, delivery_id)
    own_prefixes = (f"{base_url.rstrip('/')}/t/", f"{base_url.rstrip('/')}/p/")

    def rewrite_tag(match: re.Match[str]) -> str:
        tag = match.group(0)
        for attribute in _ATTRIBUTE.finditer(tag, 2, len(tag) - 1):
            if attribute.group(1).lower() != "href":
                continue
            raw = attribute.group(2)
            if raw is None:
                return tag
            quoted = raw[0] in "\"'"
            value = html_lib.unescape(raw[1:-1] if quoted else raw).strip()
            if value.startswith(own_prefixes) or not is_trackable_url(value):
                return tag
            try:
                tracked = click_url(
                    base_url, secret, delivery_id, value, organization_id=organization_id
                )
            except ValueError:
                return tag
            quote = raw[0] if quoted else '"'
            start, end = attribute.span(2)
            return f"{tag[:start]}{quote}{html_lib.escape(tracked)}{quote}{tag[end:]}"
        return tag  # the first href wins, as in browsers; no href: nothing to track

    rewritten = _A_TAG.sub(rewrite_tag, html)
    pixel_src = open_pixel_url(base_url, secret, delivery_id, organization_id=organization_id)
    if pixel_src in rewritten:
        return rewritten
    pixel = (
        f'<img src="{html_lib.escape(pixel_src)}" width="1" height="1" alt="" style="display:none">'
    )
    ends = list(_BODY_END.finditer(rewritten))
    if not ends:
        return rewritten + pixel
    at = ends[-1].start()
    return rewritten[:at] + pixel + rewritten[at:]
