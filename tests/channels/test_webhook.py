"""The webhook provider and the private-network guard, against a local HTTP server."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import socket
import time
from typing import Any

import pytest

from tests.channels.http_server import RecordingServer, recording_server_fixture, unused_port
from whistle_web.channels import netguard
from whistle_web.channels.base import Message, SendResult, provider_class
from whistle_web.channels.kinds import Channel
from whistle_web.channels.webhook import WebhookProvider

server = recording_server_fixture()

SECRET = "whsec_0123456789abcdef"
PAYLOAD = {"event": "order.shipped", "order": {"id": 42, "items": [1, 2]}, "name": "Zoë"}
_real_getaddrinfo = socket.getaddrinfo


def webhook(url: str, *, allow_private: bool = True, **settings: Any) -> WebhookProvider:
    # The local test server is on 127.0.0.1, so most tests allow private networks.
    return WebhookProvider(
        {"url": url, "allow_private_networks": allow_private, **settings},
        {"signing_secret": SECRET},
    )


def hook(delivery_id: int, to: str = "", payload: Any = PAYLOAD) -> Message:
    return Message(delivery_id, Channel.WEBHOOK, to, {"payload": payload})


def fake_dns(monkeypatch: pytest.MonkeyPatch, answers: dict[str, list[list[str]]]) -> list[str]:
    """Answer getaddrinfo for the given names; each lookup takes the next answer (the last
    one repeats). Other names resolve normally. Returns the names looked up, in order."""
    lookups: list[str] = []

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name not in answers:
            return _real_getaddrinfo(host, port, *args, **kwargs)
        lookups.append(name)
        queue = answers[name]
        addresses = queue.pop(0) if len(queue) > 1 else queue[0]
        results = []
        for address in addresses:
            if ipaddress.ip_address(address).version == 6:
                results.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port, 0, 0)))
            else:
                results.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)))
        return results

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return lookups


def test_registered() -> None:
    assert provider_class("webhook") is WebhookProvider


def test_posts_signed_json(server: RecordingServer) -> None:
    server.respond_with(202, json={"ok": True}, headers={"X-Request-Id": "req-abc"})
    before = int(time.time())
    with webhook(server.url + "/hooks/whistle?team=7") as provider:
        results = provider.send_batch([hook(31)])

    assert results == [SendResult.sent(31, "req-abc")]
    (request,) = server.requests
    assert request.method == "POST"
    assert request.target == "/hooks/whistle?team=7"
    assert request.json() == PAYLOAD
    headers = request.headers
    assert headers["Content-Type"] == "application/json"
    assert headers["User-Agent"] == "Whistle-Webhooks/1"
    assert headers["Whistle-Delivery"] == "31"
    timestamp = headers["Whistle-Timestamp"]
    assert before <= int(timestamp) <= time.time()
    # The receiver's recipe: HMAC-SHA256 over "{timestamp}.{raw body}", hex, after "v1=".
    expected = hmac.new(
        SECRET.encode(), timestamp.encode() + b"." + request.body, hashlib.sha256
    ).hexdigest()
    assert headers["Whistle-Signature"] == f"v1={expected}"


def test_each_delivery_is_signed_separately_over_one_connection(server: RecordingServer) -> None:
    with webhook(server.url) as provider:
        results = provider.send_batch(
            [hook(1, payload={"n": 1}), hook(2, payload={"n": 2, "more": "x"})]
        )
    assert [result.ok for result in results] == [True, True]
    assert [result.provider_message_id for result in results] == [None, None]
    first, second = server.requests
    assert first.headers["Whistle-Signature"] != second.headers["Whistle-Signature"]
    assert [first.headers["Whistle-Delivery"], second.headers["Whistle-Delivery"]] == ["1", "2"]
    assert first.client_address == second.client_address


def test_the_message_address_overrides_the_url(server: RecordingServer) -> None:
    with webhook(server.url + "/configured") as provider:
        provider.send_batch([hook(1, to=server.url + "/per-recipient"), hook(2, to="")])
    assert [request.path for request in server.requests] == ["/per-recipient", "/configured"]


@pytest.mark.parametrize(
    ("status", "ok", "transient"),
    [
        (200, True, False),
        (204, True, False),
        (408, False, True),
        (429, False, True),
        (500, False, True),
        (502, False, True),
        (503, False, True),
        (400, False, False),
        (401, False, False),
        (404, False, False),
        (410, False, False),
        (422, False, False),
    ],
)
def test_status_mapping(server: RecordingServer, status: int, ok: bool, transient: bool) -> None:
    server.respond_with(status, body="" if ok else "nope: " + "x" * 5000)
    with webhook(server.url) as provider:
        (result,) = provider.send_batch([hook(8)])
    assert (result.ok, result.transient, result.invalid_address) == (ok, transient, False)
    if not ok:
        assert (result.error or "").startswith(f"Webhook endpoint answered HTTP {status}: nope")
        assert len(result.error or "") < 300  # a huge error body is not copied in


def test_never_follows_redirects(server: RecordingServer) -> None:
    server.respond_with(302, headers={"Location": server.url + "/elsewhere"})
    with webhook(server.url + "/hook") as provider:
        (result,) = provider.send_batch([hook(1)])
    assert not result.ok and not result.transient
    assert "HTTP 302" in (result.error or "") and "not followed" in (result.error or "")
    assert [request.path for request in server.requests] == ["/hook"]


def test_a_timeout_is_transient(server: RecordingServer) -> None:
    server.respond_with(200, delay=3)
    with webhook(server.url, timeout=0.2) as provider:
        (result,) = provider.send_batch([hook(1)])
    assert not result.ok and result.transient
    assert "timed out" in (result.error or "")


def test_connection_refused_is_transient_for_that_delivery_only(server: RecordingServer) -> None:
    closed = f"http://127.0.0.1:{unused_port()}/hook"
    with webhook(server.url) as provider:
        refused, delivered = provider.send_batch([hook(1, to=closed), hook(2)])
    assert not refused.ok and refused.transient
    assert "ConnectError" in (refused.error or "")
    assert delivered.ok


def test_payload_must_be_a_json_object(server: RecordingServer) -> None:
    with webhook(server.url) as provider:
        results = provider.send_batch([hook(1, payload=[1, 2]), hook(2, payload={"t": object()})])
    assert [(r.ok, r.transient) for r in results] == [(False, False), (False, False)]
    assert server.requests == []


# -- private networks --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/hook",
        "http://10.1.2.3/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:{port}/hook",
        "http://localhost:{port}/hook",
        "http://[::ffff:127.0.0.1]:{port}/hook",
        "http://0.0.0.0:{port}/hook",
        "http://2130706433:{port}/hook",  # 127.0.0.1 as one decimal number
        "http://192.168.1.10/hook",
        "http://100.64.0.1/hook",
        "http://[fd00::1]/hook",
        "ftp://example.com/hook",
        "file:///etc/passwd",
        "not a url",
    ],
)
def test_refuses_private_destinations(server: RecordingServer, url: str) -> None:
    url = url.format(port=server.port)
    with webhook(server.url, allow_private=False) as provider:
        results = provider.send_batch([hook(1, to=url)])
    (result,) = results
    assert not result.ok and not result.transient
    assert (result.error or "").startswith("Blocked webhook destination:")
    assert server.requests == []


def test_the_configured_url_is_guarded_too(server: RecordingServer) -> None:
    with webhook(f"http://localhost:{server.port}/", allow_private=False) as provider:
        (result,) = provider.send_batch([hook(1)])
    assert "private networks are not allowed" in (result.error or "")
    assert server.requests == []


def test_allow_private_networks_reaches_loopback(server: RecordingServer) -> None:
    with webhook(f"http://localhost:{server.port}/hook", allow_private=True) as provider:
        (result,) = provider.send_batch([hook(1)])
    assert result.ok
    assert len(server.requests) == 1


def test_a_host_with_any_private_address_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_dns(monkeypatch, {"mixed.example": [["93.184.216.34", "10.0.0.7"]]})
    with pytest.raises(netguard.BlockedDestination, match=r"mixed.example \(10.0.0.7\)"):
        netguard.check_url("https://mixed.example/hook", allow_private=False)


def test_dns_rebinding_between_check_and_connect_is_refused(
    server: RecordingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Public for the check, loopback for the connection: the transport resolves and checks
    # again, and connects only to what it checked.
    lookups = fake_dns(monkeypatch, {"rebind.example": [["93.184.216.34"], ["127.0.0.1"]]})
    with webhook(f"http://rebind.example:{server.port}/hook", allow_private=False) as provider:
        (result,) = provider.send_batch([hook(1)])
    assert lookups == ["rebind.example", "rebind.example"]
    assert not result.ok and not result.transient
    assert "rebind.example (127.0.0.1) is a loopback address" in (result.error or "")
    assert server.requests == []


def test_the_transport_connects_to_the_address_it_resolved(
    server: RecordingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_dns(monkeypatch, {"hooks.customer.test": [["127.0.0.1"]]})
    with webhook(f"http://hooks.customer.test:{server.port}/hook") as provider:
        (result,) = provider.send_batch([hook(1)])
    assert result.ok
    assert server.requests[0].headers["Host"] == f"hooks.customer.test:{server.port}"


def test_an_unresolvable_host_is_transient(monkeypatch: pytest.MonkeyPatch) -> None:
    def getaddrinfo(*args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    with webhook("https://gone.example/hook", allow_private=False) as provider:
        (result,) = provider.send_batch([hook(1)])
    assert not result.ok and result.transient
    assert "cannot resolve 'gone.example'" in (result.error or "")


@pytest.mark.parametrize(
    ("address", "blocked"),
    [
        ("93.184.216.34", False),
        ("2606:4700:4700::1111", False),
        ("::ffff:93.184.216.34", False),
        ("64:ff9b::5db8:d822", False),  # NAT64 of 93.184.216.34
        ("127.0.0.1", True),
        ("10.0.0.1", True),
        ("172.16.5.4", True),
        ("192.168.0.1", True),
        ("169.254.169.254", True),
        ("100.64.0.1", True),
        ("0.0.0.0", True),  # noqa: S104
        ("224.0.0.1", True),
        ("240.0.0.1", True),
        ("255.255.255.255", True),
        ("::1", True),
        ("::", True),
        ("fe80::1", True),
        ("fd12:3456::1", True),
        ("ff02::1", True),
        ("::ffff:10.0.0.1", True),
        ("::ffff:169.254.169.254", True),
        ("64:ff9b::a00:1", True),  # NAT64 of 10.0.0.1
        ("2002:a00:1::1", True),  # 6to4 of 10.0.0.1
        ("2001:db8::1", True),  # documentation range
    ],
)
def test_blocked_addresses(address: str, blocked: bool) -> None:
    assert (netguard.blocked_reason(ipaddress.ip_address(address)) is not None) is blocked


def test_check_url_with_private_networks_allowed_still_checks_the_scheme() -> None:
    netguard.check_url("http://127.0.0.1/", allow_private=True)
    netguard.check_url("https://[::1]:8443/x", allow_private=True)
    with pytest.raises(netguard.BlockedDestination, match="scheme 'gopher'"):
        netguard.check_url("gopher://127.0.0.1/", allow_private=True)
    with pytest.raises(netguard.BlockedDestination, match="no host"):
        netguard.check_url("http:///path", allow_private=True)


def test_validate() -> None:
    good = {"url": "https://hooks.example.com/whistle"}
    credentials = {"signing_secret": SECRET}
    assert WebhookProvider.validate(good, credentials) == []
    assert (
        WebhookProvider.validate(
            {**good, "timeout": 30, "allow_private_networks": True}, credentials
        )
        == []
    )

    def fields(settings: dict[str, Any], creds: dict[str, Any] = credentials) -> set[str]:
        return {error.field for error in WebhookProvider.validate(settings, creds)}

    assert fields({}, {}) == {"settings.url", "credentials.signing_secret"}
    assert fields({"url": "ftp://hooks.example.com"}) == {"settings.url"}
    assert fields({"url": "hooks.example.com/whistle"}) == {"settings.url"}
    assert fields(good, {"signing_secret": "short"}) == {"credentials.signing_secret"}
    assert fields({**good, "timeout": 31}) == {"settings.timeout"}
    assert fields({**good, "timeout": 0}) == {"settings.timeout"}
    assert fields({**good, "allow_private_networks": "yes"}) == {"settings.allow_private_networks"}


def test_signature_matches_the_documented_recipe() -> None:
    from whistle_web.channels.webhook import sign

    body = json.dumps(PAYLOAD).encode()
    digest = hmac.new(SECRET.encode(), b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign(SECRET, 1700000000, body) == f"v1={digest}"
