"""Helpers shared by the tracking tests (plain functions; each module wraps them in fixtures)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select

from whistle_web.channels.kinds import PROVIDER_CHANNEL, Channel, ProviderKind
from whistle_web.deliveries.models import Delivery, DeliveryEvent, StatScope
from whistle_web.deliveries.services import funnel, rebuild_stats
from whistle_web.deliveries.status import DeliveryStatus
from whistle_web.extensions import db
from whistle_web.models import Notification, Organization, Provider, Recipient, SendRequest
from whistle_web.tenancy import organization_scope

_names = itertools.count(1)


def make_delivery(
    org: Organization,
    recipient: Recipient,
    send_request: SendRequest,
    *,
    channel: Channel = Channel.EMAIL,
    status: DeliveryStatus = DeliveryStatus.SENT,
    address: str | None = None,
    provider: Provider | None = None,
    provider_message_id: str | None = None,
) -> Delivery:
    """A delivery the provider accepted an hour ago, with counters rebuilt from the ledger."""
    with organization_scope(org.id):
        notification = Notification(
            send_request_id=send_request.id,
            template_id=send_request.template_id,
            recipient_id=recipient.id,
        )
        db.session.add(notification)
        db.session.flush()
        delivery = Delivery(
            notification_id=notification.id,
            recipient_id=recipient.id,
            template_id=send_request.template_id,
            channel=channel,
            status=status,
            address=address or (recipient.email if channel == Channel.EMAIL else recipient.phone),
            provider_id=provider.id if provider else None,
            provider_message_id=provider_message_id,
            sent_at=datetime.now(UTC) - timedelta(hours=1),
        )
        db.session.add(delivery)
        db.session.flush()
        # Start from counters that agree with the ledger, as the send pipeline leaves them.
        rebuild_stats(StatScope.TEMPLATE, send_request.template_id)
        db.session.flush()
    return delivery


def make_provider(
    org: Organization,
    kind: ProviderKind,
    credentials: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
) -> Provider:
    with organization_scope(org.id):
        provider = Provider(
            channel=PROVIDER_CHANNEL[kind],
            kind=kind,
            name=f"{kind.value} provider {next(_names)}",
            settings=settings or {},
        )
        provider.set_credentials(credentials or {})
        db.session.add(provider)
        db.session.flush()
    return provider


def reload(org: Organization, delivery: Delivery) -> Delivery:
    with organization_scope(org.id):
        db.session.expire_all()
        return db.session.get(Delivery, delivery.id)


def events_of(org: Organization, delivery: Delivery) -> list[DeliveryEvent]:
    with organization_scope(org.id):
        return list(
            db.session.scalars(
                select(DeliveryEvent)
                .where(DeliveryEvent.delivery_id == delivery.id)
                .order_by(DeliveryEvent.id)
            )
        )


def assert_counters_match_ledger(org: Organization, template_id: int) -> dict[str, Any]:
    """The live counters equal what rebuild_stats derives from the ledger; returns them."""
    with organization_scope(org.id):
        live = funnel(StatScope.TEMPLATE, template_id)
        rebuild_stats(StatScope.TEMPLATE, template_id)
        rebuilt = funnel(StatScope.TEMPLATE, template_id)
    assert live == rebuilt
    return live
