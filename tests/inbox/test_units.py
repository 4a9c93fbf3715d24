"""The pieces without a server: origins, channel names, frames, rate bucket, the hub queue."""

from __future__ import annotations

import threading

import pytest

from whistle_web.inbox.hub import MAX_PENDING, Client, parse_channel
from whistle_web.inbox.socket import (
    Close,
    TokenBucket,
    normalize_origin,
    origin_allowed,
    parse_frame,
)

BASE = "https://whistle.example.com"


@pytest.mark.parametrize(
    ("origin", "allowed", "ok"),
    [
        (None, [], True),  # not a browser
        ("https://app.example.com", ["https://app.example.com"], True),
        ("https://APP.example.com:443", ["https://app.example.com/"], True),
        ("http://app.example.com", ["https://app.example.com"], False),
        ("https://app.example.com:8443", ["https://app.example.com"], False),
        ("https://evil.example.com", ["https://app.example.com"], False),
        ("https://whistle.example.com", [], True),  # our own origin
        ("null", ["null"], False),
        ("file://", [], False),
        ("https://[::1]:8000", ["https://[::1]:8000"], True),
        ("https://bad port:x", ["https://bad port:x"], False),
    ],
)
def test_origin_allowed(origin, allowed, ok):
    assert origin_allowed(origin, allowed, BASE) is ok


def test_normalize_origin():
    assert normalize_origin("HTTP://Example.COM:80/path") == "http://example.com"
    assert normalize_origin("ftp://example.com") is None


def test_parse_channel():
    assert parse_channel("whistle:inbox:12:345") == (12, 345)
    for bad in ("whistle:inbox:12", "whistle:inbox:a:1", "other:inbox:1:2", "whistle:inbox:1:2:3"):
        assert parse_channel(bad) is None


@pytest.mark.parametrize(
    "raw", ["", "nope", b"\xff", "[]", "{}", '{"type": "delete"}', '{"type": ["auth"]}']
)
def test_malformed_frames(raw):
    with pytest.raises(Close) as closed:
        parse_frame(raw)
    assert closed.value.code == 4400


def test_frames_parse():
    assert parse_frame('{"type": "read", "id": 3}') == {"type": "read", "id": 3}
    assert parse_frame(b'{"type": "pong"}') == {"type": "pong"}


def test_token_bucket_allows_a_burst_then_the_rate():
    bucket = TokenBucket(rate=20, burst=40)
    assert all(bucket.take() for _ in range(40))
    assert not bucket.take()


def test_a_client_far_behind_switches_to_a_resume():
    wake = threading.Event()
    client = Client(1, 2, wake)
    for i in range(MAX_PENDING):
        client.push(f'{{"seq":{i}}}')
    assert wake.is_set() and len(client.pending) == MAX_PENDING and not client.needs_resync
    client.push('{"seq":999}')
    assert client.needs_resync and not client.pending
