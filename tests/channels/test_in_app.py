"""The in-app provider: frames as the protocol describes them, published on real Redis."""

from __future__ import annotations

import json
import random

import pytest

from whistle_web.channels.base import Message
from whistle_web.channels.in_app import InAppProvider, frames_of, inbox_channel
from whistle_web.channels.kinds import Channel


def _message(delivery_id: int, content: dict, data: object, **meta: object) -> Message:
    return Message(
        delivery_id,
        Channel.IN_APP,
        "u1",
        content,
        meta={
            "organization_id": 7,
            "recipient_id": 11,
            "notification_id": 3,
            "data": data,
            "created_at": "2026-11-24T09:00:00+00:00",
            "seq": 42,
            **meta,
        },
    )


def _as_dict(message: Message) -> dict:
    """The frame as the protocol (README) defines it, built the obvious way."""
    return {
        "type": "notification",
        "seq": message.meta.get("seq"),
        "id": message.delivery_id,
        "delivery_id": message.delivery_id,
        "notification_id": message.meta.get("notification_id"),
        "title": message.content.get("title", ""),
        "body": message.content.get("body", ""),
        "action_url": message.content.get("action_url"),
        "data": message.meta.get("data", {}),
        "created_at": message.meta.get("created_at"),
        "seen_at": None,
        "read_at": None,
        "archived_at": None,
        "clicked_at": None,
    }


TEXTS = ['Hi "Zoë"', "line\nbreak \\ back", "</script><b>", "emoji 🎉 \u2028", "", "plain"]


@pytest.mark.parametrize("seed", range(20))
def test_the_frame_is_the_json_of_the_protocols_dict(seed):
    rng = random.Random(seed)
    content = {"title": rng.choice(TEXTS), "body": rng.choice(TEXTS)}
    if rng.random() < 0.5:
        content["action_url"] = "https://example.com/?q=" + rng.choice(TEXTS)
    data = rng.choice([{}, {"order": {"id": 5, "total": 9.5, "items": ["a", None, True]}}])
    message = _message(rng.randrange(1, 10**12), content, data)
    channel, frame = frames_of([message])
    assert channel == inbox_channel(7, 11)
    assert json.loads(frame) == _as_dict(message)
    # The same text as encoding the dict, key order included.
    assert frame == json.dumps(_as_dict(message), separators=(",", ":"), default=str)


def test_a_batch_is_published_on_each_recipients_channel(redis):
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    org = random.randrange(10**6, 10**7)  # pub/sub ignores database numbers
    pubsub.psubscribe(f"whistle:inbox:{org}:*")
    pubsub.get_message(timeout=1)
    shared = {"headline": "Dark mode"}
    messages = [
        _message(i, {"title": f"T{i}", "body": "B"}, shared, organization_id=org, recipient_id=i)
        for i in range(1, 4)
    ]
    with InAppProvider({}, {}, redis=redis) as provider:
        results = provider.send_batch(messages)
    assert [r.ok for r in results] == [True, True, True]
    received = {}
    while len(received) < 3:
        item = pubsub.get_message(timeout=2)
        assert item is not None, received
        received[item["channel"].decode()] = json.loads(item["data"])
    pubsub.close()
    for message in messages:
        frame = received[inbox_channel(org, message.delivery_id)]
        assert frame == _as_dict(message)
