"""Twilio request signatures (``X-Twilio-Signature``): pure functions, also used by tests.

Twilio signs the full URL it requested (query string included) followed by every POST
parameter name and value, names sorted, with HMAC-SHA1 keyed by the account's auth token,
base64-encoded. See https://www.twilio.com/docs/usage/webhooks/webhooks-security.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

DEFAULT_PORTS = {"http": 80, "https": 443}


def _values(params: Any, name: str) -> list[str]:
    getlist = getattr(params, "getlist", None)
    if getlist is not None:  # werkzeug MultiDict: every value of a repeated field
        return [str(v) for v in getlist(name)]
    value = params[name]
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    return [str(value)]


def signed_data(url: str, params: Mapping[str, Any] | None = None) -> str:
    """The string Twilio signs: the URL, then ``name + value`` for each parameter by name."""
    parts = [url]
    for name in sorted(params or {}):
        for value in sorted(_values(params, name)):
            parts.append(name + value)
    return "".join(parts)


def compute_signature(auth_token: str, url: str, params: Mapping[str, Any] | None = None) -> str:
    """base64(HMAC-SHA1(auth_token, url + sorted params)), as in ``X-Twilio-Signature``."""
    mac = hmac.new(
        auth_token.encode("utf-8"), signed_data(url, params).encode("utf-8"), hashlib.sha1
    )
    return base64.b64encode(mac.digest()).decode("ascii")


def url_variants(url: str) -> Iterable[str]:
    """The URL as given, then with the default port removed or added.

    Twilio may or may not include ``:443`` in the URL it signs; its own validators accept both.
    """
    yield url
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return
    default = DEFAULT_PORTS.get(parts.scheme)
    if default is None or parts.hostname is None:
        return
    host = parts.netloc.rsplit("@", 1)[-1]
    userinfo = parts.netloc[: len(parts.netloc) - len(host)]
    if port is None:
        netloc = f"{userinfo}{host}:{default}"
    elif port == default:
        netloc = userinfo + host.rsplit(":", 1)[0]
    else:
        return
    yield urlunsplit(parts._replace(netloc=netloc))


def is_valid(
    auth_token: str, url: str, params: Mapping[str, Any] | None, signature: str | None
) -> bool:
    """True when ``signature`` is Twilio's signature of this request (constant-time check)."""
    if not auth_token or not signature:
        return False
    given = signature.strip().encode("ascii", "replace")
    valid = False
    for candidate in url_variants(url):
        expected = compute_signature(auth_token, candidate, params).encode("ascii")
        # Check every variant so the time taken does not depend on which one matched.
        valid |= hmac.compare_digest(expected, given)
    return valid
