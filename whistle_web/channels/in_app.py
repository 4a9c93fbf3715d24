"""In-app notifications: the delivery row is the stored inbox item; this publishes it live.

Each message is published on the recipient's Redis channel, ``whistle:inbox:<org>:<recipient>``;
every web process holds one pattern subscription and pushes it to that recipient's open
sockets. Redis may be flushed at any moment: the inbox itself lives in PostgreSQL, so a
missed publish only means the widget shows the item on its next fetch instead of at once.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import redis

from whistle_web.channels.base import (
    BaseProvider,
    Message,
    ProviderUnavailable,
    SendResult,
    register,
)
from whistle_web.channels.kinds import ProviderKind

CHANNEL_PREFIX = "whistle:inbox"


def inbox_channel(organization_id: int, recipient_id: int) -> str:
    return f"{CHANNEL_PREFIX}:{organization_id}:{recipient_id}"


@register
class InAppProvider(BaseProvider):
    kind = ProviderKind.IN_APP

    def send_batch(self, messages: Sequence[Message]) -> list[SendResult]:
        if self.redis is None:
            raise ProviderUnavailable("the in-app provider needs a Redis connection")
        pipe = self.redis.pipeline(transaction=False)
        for message in messages:
            payload = {
                "type": "notification",
                "delivery_id": message.delivery_id,
                "notification_id": message.meta.get("notification_id"),
                "title": message.content.get("title", ""),
                "body": message.content.get("body", ""),
                "action_url": message.content.get("action_url"),
                "data": message.meta.get("data", {}),
                "created_at": message.meta.get("created_at"),
            }
            channel = inbox_channel(message.meta["organization_id"], message.meta["recipient_id"])
            pipe.publish(channel, json.dumps(payload, separators=(",", ":"), default=str))
        try:
            pipe.execute()
        except redis.RedisError as error:
            # Stored in PostgreSQL already; the live push is what failed. Try again later.
            return [SendResult.failed(m.delivery_id, str(error), transient=True) for m in messages]
        return [SendResult.sent(m.delivery_id) for m in messages]
