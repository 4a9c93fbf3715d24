"""Keep outgoing requests to customer-supplied URLs away from private networks (SSRF guard).

A webhook URL is chosen by a customer, so without a check Whistle could be made to POST to
its own infrastructure: the cloud metadata service (169.254.169.254), databases on 10.x,
admin ports on 127.0.0.1. Two layers:

* :func:`check_url` — before sending: the scheme must be http/https and *every* address the
  host resolves to must be public. A host that resolves to one public and one private
  address is refused, since either could be picked.
* :class:`GuardedTransport` — an ``httpx`` transport whose connections go only to addresses
  it resolved and checked itself, at connect time. This closes the resolve-then-connect race
  (DNS rebinding: a name that resolves to a public address for the check and to 127.0.0.1 a
  moment later for the connection): the address checked is the address connected to. TLS
  still verifies the certificate against the URL's host name (SNI and verification use the
  origin host, not the IP). Clients using it must not use proxies from the environment
  (``trust_env=False``), which would do their own resolution behind the check.

Refused: loopback, RFC 1918 and other private ranges, link-local (incl. the metadata
address), multicast, reserved, unspecified (0.0.0.0, ::), carrier-grade NAT (100.64/10) and
anything else not globally routable; for IPv6 also the IPv4 addresses embedded by
IPv4-mapped (::ffff:a.b.c.d), NAT64 (64:ff9b::/96) and 6to4 (2002::/16) addresses.

Residual risks: a public address that forwards to internal services (an open proxy, a load
balancer the operator set up) cannot be told apart; and redirects must not be followed by
the caller (the webhook provider never follows them).
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ALLOWED_SCHEMES = ("http", "https")
DEFAULT_PORTS = {"http": 80, "https": 443}

_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")


class BlockedDestination(Exception):
    """The URL may not be requested: wrong scheme or a non-public address."""


class UnresolvableHost(Exception):
    """The host name did not resolve (may be temporary: a DNS outage)."""


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


def blocked_reason(address: IPAddress) -> str | None:
    """Why the address may not be contacted, or None when it is a public address."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            reason = blocked_reason(embedded)
            return f"embeds {embedded}, which is {reason}" if reason else None
        if address in _NAT64_LOCAL:
            return "a local-use NAT64 address"
    checks = (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
        ("carrier-grade NAT", isinstance(address, ipaddress.IPv4Address) and address in _CGNAT),
        ("not globally routable", not address.is_global),
    )
    for reason, hit in checks:
        if hit:
            return f"a {reason} address"
    return None


def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address ``host`` resolves to (an IP literal resolves to itself), in order."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnresolvableHost(f"cannot resolve {host!r}: {exc}") from exc
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _canonname, sockaddr in infos:
        address = ipaddress.ip_address(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise UnresolvableHost(f"cannot resolve {host!r}: no addresses")
    return addresses


def checked_addresses(host: str, port: int, allow_private: bool) -> list[IPAddress]:
    """Resolve ``host``; raise :class:`BlockedDestination` if any address is not public."""
    addresses = resolve(host, port)
    if not allow_private:
        for address in addresses:
            reason = blocked_reason(address)
            if reason:
                shown = host if host == str(address) else f"{host} ({address})"
                raise BlockedDestination(
                    f"{shown} is {reason}; requests to private networks are not allowed"
                )
    return addresses


def split_url(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL; :class:`BlockedDestination` when unusable."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise BlockedDestination(f"invalid URL {url!r}: {exc}") from exc
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise BlockedDestination(f"URL scheme {scheme or '(none)'!r} is not allowed; use https")
    host = parts.hostname
    if not host:
        raise BlockedDestination(f"URL {url!r} has no host")
    return scheme, host, port or DEFAULT_PORTS[scheme]


def check_url(url: str, allow_private: bool) -> None:
    """Raise :class:`BlockedDestination` unless ``url`` is http(s) to public addresses only.

    With ``allow_private`` only the scheme is checked (no DNS lookup). Raises
    :class:`UnresolvableHost` when the host does not resolve.
    """
    _scheme, host, port = split_url(url)
    if not allow_private:
        checked_addresses(host, port, allow_private=False)


class GuardedBackend(httpcore.SyncBackend):
    """Resolves and checks the host itself, then connects only to the checked addresses."""

    def __init__(self, allow_private: bool) -> None:
        self.allow_private = allow_private

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        try:
            addresses = checked_addresses(host, port, self.allow_private)
        except UnresolvableHost as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        error: Exception | None = None
        for address in addresses:
            try:
                # An IP literal: create_connection does no further DNS lookup.
                return super().connect_tcp(
                    str(address), port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        assert error is not None
        raise error


class GuardedTransport(httpx.HTTPTransport):
    """An ``httpx`` transport pinned to checked addresses (see the module docstring).

    :class:`BlockedDestination` raised at connect time propagates out of ``client.send``
    unchanged (httpx only maps its own exceptions). Build the client with
    ``trust_env=False``: otherwise httpx mounts proxies from the environment (HTTP_PROXY...)
    in front of this transport, and a proxy resolves names itself, behind the check.
    """

    def __init__(self, *, allow_private: bool, limits: httpx.Limits | None = None) -> None:
        limits = limits or httpx.Limits(max_connections=10, max_keepalive_connections=10)
        ssl_context = httpx.create_ssl_context()  # honours SSL_CERT_FILE / SSL_CERT_DIR
        super().__init__(verify=ssl_context, trust_env=False, limits=limits)
        # httpx builds its httpcore pool without a way to pass a network backend, so the
        # pool is rebuilt with the same settings plus the guarded backend (the DNS rebinding
        # test in tests/channels/test_webhook.py fails if this stops taking effect).
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=GuardedBackend(allow_private),
        )
