"""Database constraints and cascade rules of the domain model."""

from __future__ import annotations

import pytest
from sqlalchemy import delete, func, select, text, update
from sqlalchemy.exc import IntegrityError

from tests.factories import SYSTEM
from whistle_web.channels.kinds import Channel, ProviderKind
from whistle_web.deliveries.status import DeliveryStatus
from whistle_web.errors import NotFound
from whistle_web.extensions import db
from whistle_web.models import (
    AudienceType,
    Campaign,
    Category,
    Delivery,
    Device,
    DeviceKind,
    Notification,
    Organization,
    Preference,
    Provider,
    Recipient,
    SendRequest,
    Template,
    TemplateVersion,
)
from whistle_web.tenancy import organization_scope, unscoped


def _flush_fails(match: str) -> None:
    with pytest.raises(IntegrityError, match=match), db.session.begin_nested():
        db.session.flush()


def test_external_id_is_unique_per_organization(org, other_org, make_recipient):
    make_recipient(org, "user-1")
    make_recipient(other_org, "user-1")  # the same id in another organization is fine
    with organization_scope(org.id):
        db.session.add(Recipient(external_id="user-1"))
        _flush_fails("uq_recipients_organization_id_external_id")


def test_preferences_are_unique_even_with_null_category_or_channel(org, make_recipient):
    recipient = make_recipient(org)
    with organization_scope(org.id):
        db.session.add(Preference(recipient_id=recipient.id, channel=None, enabled=False))
        db.session.flush()
        db.session.add(Preference(recipient_id=recipient.id, channel=None, enabled=True))
        _flush_fails("uq_preferences")


def test_unknown_enum_values_are_refused_by_the_database(org):
    with organization_scope(org.id):
        provider = Provider(
            channel=Channel.EMAIL, kind=ProviderKind.SMTP, name="p", credentials_encrypted=b"x"
        )
        db.session.add(provider)
        db.session.flush()
        with pytest.raises(IntegrityError, match="ck_providers"), db.session.begin_nested():
            # Raw SQL: SQLAlchemy would refuse the value before PostgreSQL sees it.
            db.session.execute(
                text("UPDATE providers SET kind = 'pigeon' WHERE id = :id"),
                {"id": provider.id},
            )


def test_rate_limit_must_be_positive(org):
    with organization_scope(org.id):
        db.session.add(
            Provider(
                channel=Channel.SMS,
                kind=ProviderKind.TWILIO,
                name="t",
                credentials_encrypted=b"x",
                rate_limit_per_second=0,
            )
        )
        _flush_fails("rate_limit_positive")


@pytest.fixture
def sent(org, make_recipient, make_template, make_send_request):
    """A recipient with one notification and a delivered email."""
    recipient = make_recipient(org, "erase-me", email="erase@example.com")
    template = make_template(org, "digest")
    with organization_scope(org.id):
        campaign = Campaign(
            name="C", template_id=template.id, channels=["email"], audience_type=AudienceType.ALL
        )
        db.session.add(campaign)
        db.session.flush()
    request = make_send_request(org, template=template, campaign=campaign)
    with organization_scope(org.id):
        notification = Notification(
            send_request_id=request.id, campaign_id=campaign.id, recipient_id=recipient.id
        )
        db.session.add(notification)
        db.session.flush()
        delivery = Delivery(
            notification_id=notification.id,
            recipient_id=recipient.id,
            campaign_id=campaign.id,
            channel=Channel.EMAIL,
            status=DeliveryStatus.DELIVERED,
        )
        db.session.add_all(
            [delivery, Device(recipient_id=recipient.id, kind=DeviceKind.FCM, token="t")]
        )
        db.session.flush()
        version = template.published_version
    return recipient, template, version, campaign, delivery


def test_erasing_a_recipient_keeps_anonymised_deliveries(org, sent):
    from whistle_web.recipients.services import erase_recipient

    recipient, _, _, _, delivery = sent
    with organization_scope(org.id):
        db.session.execute(
            update(Delivery)
            .where(Delivery.id == delivery.id)
            .values(address="someone@example.com", rendered={"subject": "Hi Someone"})
        )
        erase_recipient(recipient.id, actor=SYSTEM)
        db.session.expire_all()
        kept = db.session.get(Delivery, delivery.id)
        assert kept is not None and kept.recipient_id is None
        assert kept.address is None and kept.rendered is None
        assert kept.status == DeliveryStatus.DELIVERED
        notification = db.session.get(Notification, kept.notification_id)
        assert notification.recipient_id is None and notification.data == {}
        assert db.session.scalar(select(func.count()).select_from(Device)) == 0
        assert db.session.get(Recipient, recipient.id) is None
        with pytest.raises(NotFound):
            erase_recipient(recipient.id, actor=SYSTEM)


def test_a_template_in_use_by_a_campaign_cannot_be_deleted(org, sent):
    _, template, _, _, _ = sent
    with (
        organization_scope(org.id),
        pytest.raises(IntegrityError, match="fk_campaigns_template_id"),
        db.session.begin_nested(),
    ):
        db.session.execute(delete(Template).where(Template.id == template.id))


def test_deleting_a_campaign_removes_its_sends(org, sent):
    _, _, _, campaign, _delivery = sent
    with organization_scope(org.id):
        db.session.execute(delete(Campaign).where(Campaign.id == campaign.id))
        assert db.session.scalar(select(func.count()).select_from(Delivery)) == 0
        assert db.session.scalar(select(func.count()).select_from(SendRequest)) == 0


@pytest.mark.committed
def test_deleting_an_organization_removes_everything_it_owns(org, other_org, sent, make_recipient):
    make_recipient(other_org, "survivor")
    # Committed first, as in production: an organization is never deleted in the
    # transaction that wrote its deliveries (PostgreSQL re-checks foreign keys on rows the
    # deleting transaction inserted itself, even when the cascade leaves the keys as they were).
    db.session.commit()
    db.session.execute(delete(Organization).where(Organization.id == org.id))
    db.session.expire_all()
    remaining = db.session.scalars(unscoped(select(Recipient.external_id))).all()
    assert remaining == ["survivor"]
    for model in (Delivery, Notification, Template, TemplateVersion, Campaign, Category):
        count = db.session.scalar(unscoped(select(func.count()).select_from(model)))
        assert count == 0, model.__name__


def test_publishing_points_the_template_at_its_version(org, sent):
    _, template, version, _, _ = sent
    db.session.expire_all()
    with organization_scope(org.id):
        assert db.session.get(Template, template.id).published_version.id == version.id


@pytest.mark.parametrize("rate", ["NaN", "Infinity"])
def test_rate_limit_must_be_finite(org, rate):
    with organization_scope(org.id):
        provider = Provider(
            channel=Channel.SMS, kind=ProviderKind.TWILIO, name="t", credentials_encrypted=b"x"
        )
        db.session.add(provider)
        db.session.flush()
        with pytest.raises(IntegrityError, match="rate_limit_positive"), db.session.begin_nested():
            db.session.execute(
                text(
                    "UPDATE providers SET rate_limit_per_second = CAST(:r AS float) WHERE id = :id"
                ),
                {"r": rate, "id": provider.id},
            )
