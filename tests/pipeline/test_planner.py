"""The planner's rules: preferences matrix, suppression, caps, quiet hours, local time."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import func, select

from tests.factories import SYSTEM
from tests.pipeline.conftest import CONTENT, assert_counters_match_ledger
from whistle_web.channels.kinds import Channel
from whistle_web.deliveries.models import Delivery, DeliveryStat, StatScope
from whistle_web.deliveries.planner import next_local_time, plan, quiet_hours_end
from whistle_web.deliveries.status import DeliveryStatus, SuppressionCause
from whistle_web.extensions import db
from whistle_web.models import (
    Device,
    DeviceKind,
    Organization,
    Preference,
    Suppression,
    SuppressionReason,
)
from whistle_web.notifications.services import trigger
from whistle_web.tenancy import organization_scope

UTC_ZONE = ZoneInfo("UTC")


def _plan(org, template_key, externals, channels, **kwargs):
    with organization_scope(org.id):
        request = trigger(template_key, to=externals, channels=channels, actor=SYSTEM, **kwargs)
        plan(request.id)
        rows = db.session.execute(
            select(
                Delivery.recipient_id,
                Delivery.channel,
                Delivery.status,
                Delivery.suppression_reason,
                Delivery.not_before,
            )
        ).all()
    return {(r.recipient_id, r.channel.value): r for r in rows}


@pytest.fixture
def template(org, make_template, category):
    def make(*, critical: bool = False, channels=None):  # type: ignore[no-untyped-def]
        cat = category("security" if critical else "news", critical=critical, channels=channels)
        t = make_template(org, f"t-{cat.key}", CONTENT)
        with organization_scope(org.id):
            t.category_id = cat.id
            db.session.flush()
        return t, cat

    return make


def test_each_rule_suppresses_with_its_reason(
    org, template, make_recipient, redis, preferences_read
):
    t, cat = template()
    ok = make_recipient(org, "ok", email="ok@example.com", phone="+14155550100")
    gone = make_recipient(org, "gone", email="gone@example.com", unsubscribed_at=datetime.now(UTC))
    bounced = make_recipient(org, "bounced", email="Bounced@Example.com")
    opted_out = make_recipient(org, "opted-out", email="o@example.com")
    no_email = make_recipient(org, "no-email")
    with organization_scope(org.id):
        db.session.add(
            Suppression(
                channel=Channel.EMAIL,
                address="bounced@example.com",
                reason=SuppressionReason.HARD_BOUNCE,
            )
        )
        db.session.add(
            Preference(
                recipient_id=opted_out.id, category_id=cat.id, channel=Channel.EMAIL, enabled=False
            )
        )
        db.session.flush()
    rows = _plan(
        org, t.key, ["ok", "gone", "bounced", "opted-out", "no-email"], ["email", "sms", "push"]
    )
    assert rows[(ok.id, "email")].status == DeliveryStatus.QUEUED
    assert rows[(ok.id, "sms")].status == DeliveryStatus.QUEUED
    assert rows[(ok.id, "push")].suppression_reason == SuppressionCause.NO_ADDRESS  # no device
    assert rows[(gone.id, "email")].suppression_reason == SuppressionCause.UNSUBSCRIBED
    assert rows[(bounced.id, "email")].suppression_reason == SuppressionCause.SUPPRESSION_LIST
    assert rows[(opted_out.id, "email")].suppression_reason == SuppressionCause.PREFERENCE
    assert rows[(opted_out.id, "sms")].suppression_reason == SuppressionCause.NO_ADDRESS
    assert rows[(no_email.id, "email")].suppression_reason == SuppressionCause.NO_ADDRESS
    # The planning statement bumps the funnels by what it wrote, in every scope.
    for scope, scope_id in ((StatScope.TEMPLATE, t.id), (StatScope.ORGANIZATION, org.id)):
        counts = assert_counters_match_ledger(org.id, scope, scope_id)
        assert counts["targeted"] == 15 and counts["queued"] == 2 and counts["suppressed"] == 13
    with organization_scope(org.id):
        reasons = dict(
            db.session.execute(
                select(DeliveryStat.metric, func.sum(DeliveryStat.value))
                .where(
                    DeliveryStat.scope == StatScope.TEMPLATE,
                    DeliveryStat.channel == Channel.EMAIL,
                    DeliveryStat.metric.like("suppressed:%"),
                )
                .group_by(DeliveryStat.metric)
            ).all()
        )
    assert reasons == {
        f"suppressed:{SuppressionCause.UNSUBSCRIBED}": 1,
        f"suppressed:{SuppressionCause.SUPPRESSION_LIST}": 1,
        f"suppressed:{SuppressionCause.PREFERENCE}": 1,
        f"suppressed:{SuppressionCause.NO_ADDRESS}": 1,
    }


def test_rules_apply_in_order(org, template, make_recipient, redis):
    """Unsubscribed beats the suppression list, which beats preferences, which beat no address."""
    t, _cat = template()
    r = make_recipient(org, "r", email="r@example.com", unsubscribed_at=datetime.now(UTC))
    with organization_scope(org.id):
        db.session.add(
            Suppression(
                channel=Channel.EMAIL, address="r@example.com", reason=SuppressionReason.COMPLAINT
            )
        )
        db.session.add(Preference(recipient_id=r.id, channel=None, enabled=False))
        db.session.flush()
    rows = _plan(org, t.key, ["r"], ["email", "sms"])
    assert rows[(r.id, "email")].suppression_reason == SuppressionCause.UNSUBSCRIBED
    assert rows[(r.id, "sms")].suppression_reason == SuppressionCause.UNSUBSCRIBED


@pytest.fixture(params=["read with the recipients", "looked up for the batch"])
def preferences_read(request, monkeypatch):  # type: ignore[no-untyped-def]
    """Both ways the planner reads preferences: with a few listed recipients, or in one
    query for a batch (any request naming more than INLINE_RECIPIENTS)."""
    from whistle_web.deliveries import planner

    if request.param == "looked up for the batch":
        monkeypatch.setattr(planner, "INLINE_RECIPIENTS", 0)
    return request.param


@pytest.mark.parametrize(
    ("prefs", "email", "sms"),
    [
        ([], True, True),
        ([(None, None, False)], False, False),  # off for everything
        ([(None, "email", False)], False, True),  # email off everywhere
        ([("cat", None, False)], False, False),  # this category off
        ([("cat", None, False), ("cat", "sms", True)], False, True),  # ...but SMS back on
        ([(None, None, False), ("cat", "email", True)], True, False),  # specific beats global
        ([(None, "sms", False), ("cat", None, True)], True, True),  # category beats channel
    ],
)
def test_preference_matrix_most_specific_wins(
    org, template, make_recipient, prefs, email, sms, redis, preferences_read
):
    t, cat = template()
    r = make_recipient(org, "r", email="r@example.com", phone="+14155550101")
    with organization_scope(org.id):
        for category_key, channel, enabled in prefs:
            db.session.add(
                Preference(
                    recipient_id=r.id,
                    category_id=cat.id if category_key else None,
                    channel=Channel(channel) if channel else None,
                    enabled=enabled,
                )
            )
        db.session.flush()
    rows = _plan(org, t.key, ["r"], ["email", "sms"])
    assert (rows[(r.id, "email")].status == DeliveryStatus.QUEUED) is email
    assert (rows[(r.id, "sms")].status == DeliveryStatus.QUEUED) is sms


def test_critical_categories_bypass_unsubscribe_preferences_and_quiet_hours(
    org, template, make_recipient, redis
):
    t, _ = template(critical=True)
    r = make_recipient(
        org,
        "r",
        email="r@example.com",
        unsubscribed_at=datetime.now(UTC),
        timezone="UTC",
        quiet_hours_start=time(0, 0),
        quiet_hours_end=time(23, 59),
    )
    with organization_scope(org.id):
        db.session.add(Preference(recipient_id=r.id, channel=None, enabled=False))
        db.session.flush()
    rows = _plan(org, t.key, ["r"], ["email"])
    assert rows[(r.id, "email")].status == DeliveryStatus.QUEUED
    assert rows[(r.id, "email")].not_before is None


def test_critical_still_respects_the_suppression_list(org, template, make_recipient, redis):
    t, _ = template(critical=True)
    r = make_recipient(org, "r", email="dead@example.com")
    with organization_scope(org.id):
        db.session.add(
            Suppression(
                channel=Channel.EMAIL,
                address="dead@example.com",
                reason=SuppressionReason.HARD_BOUNCE,
            )
        )
        db.session.flush()
    rows = _plan(org, t.key, ["r"], ["email"])
    assert rows[(r.id, "email")].suppression_reason == SuppressionCause.SUPPRESSION_LIST


def test_push_needs_an_active_device(org, template, make_recipient, redis):
    t, _ = template()
    with_device = make_recipient(org, "d")
    disabled = make_recipient(org, "x")
    with organization_scope(org.id):
        db.session.add(Device(recipient_id=with_device.id, kind=DeviceKind.FCM, token="a"))
        db.session.add(
            Device(
                recipient_id=disabled.id,
                kind=DeviceKind.FCM,
                token="b",
                disabled_at=datetime.now(UTC),
            )
        )
        db.session.flush()
    rows = _plan(org, t.key, ["d", "x"], ["push"])
    assert rows[(with_device.id, "push")].status == DeliveryStatus.QUEUED
    assert rows[(disabled.id, "push")].suppression_reason == SuppressionCause.NO_ADDRESS


def test_frequency_cap_per_recipient_per_day(org, template, make_recipient, redis):
    t, _ = template()
    make_recipient(org, "r", email="r@example.com")
    with organization_scope(org.id):
        db.session.get(Organization, org.id).settings = {"frequency_cap_per_day": 2}
        db.session.flush()
    outcomes = []
    for _ in range(3):
        rows = _plan(org, t.key, ["r"], ["email"])
        outcomes.append(rows)
    with organization_scope(org.id):
        reasons = list(
            db.session.scalars(select(Delivery.suppression_reason).order_by(Delivery.id))
        )
    assert reasons == [None, None, SuppressionCause.FREQUENCY_CAP]


def test_quiet_hours_delay_in_the_recipients_timezone(org, template, make_recipient, redis):
    t, _ = template()
    now = datetime.now(UTC)
    tokyo = ZoneInfo("Asia/Tokyo")
    local_now = now.astimezone(tokyo)
    # A quiet window around the current Tokyo time, ending in two hours.
    start = (local_now - timedelta(hours=1)).time().replace(second=0, microsecond=0)
    end = (local_now + timedelta(hours=2)).time().replace(second=0, microsecond=0)
    quiet = make_recipient(
        org,
        "q",
        email="q@example.com",
        timezone="Asia/Tokyo",
        quiet_hours_start=start,
        quiet_hours_end=end,
    )
    # The same wall-clock window is not quiet in New York right now (different zone).
    awake = make_recipient(
        org, "a", email="a@example.com", timezone="America/New_York",
        quiet_hours_start=start, quiet_hours_end=end,
    )  # fmt: skip
    rows = _plan(org, t.key, ["q", "a"], ["email"])
    delayed = rows[(quiet.id, "email")]
    assert delayed.status == DeliveryStatus.QUEUED  # delayed, not dropped
    assert delayed.not_before is not None
    assert abs(delayed.not_before - (now + timedelta(hours=2))) < timedelta(minutes=2)
    ny_clock = now.astimezone(ZoneInfo("America/New_York")).time()
    ny_quiet = (start <= ny_clock < end) if start <= end else (ny_clock >= start or ny_clock < end)
    assert (rows[(awake.id, "email")].not_before is not None) is ny_quiet


def test_local_time_sends_wait_for_nine_in_each_zone(org, template, make_recipient, redis):
    t, _ = template()
    berlin = make_recipient(org, "b", email="b@example.com", timezone="Europe/Berlin")
    la = make_recipient(org, "l", email="l@example.com", timezone="America/Los_Angeles")
    rows = _plan(org, t.key, ["b", "l"], ["email"], local_time=time(9, 0))
    for recipient, zone in ((berlin, "Europe/Berlin"), (la, "America/Los_Angeles")):
        at = rows[(recipient.id, "email")].not_before
        if at is None:  # it is exactly 09:00 there
            continue
        local = at.astimezone(ZoneInfo(zone))
        assert (local.hour, local.minute) == (9, 0)
        assert timedelta(0) < at - datetime.now(UTC) <= timedelta(days=1)


def test_quiet_hours_end_handles_windows_across_midnight():
    start, end = time(22, 0), time(7, 0)
    late = datetime(2026, 3, 1, 23, 30, tzinfo=UTC)
    early = datetime(2026, 3, 2, 6, 0, tzinfo=UTC)
    noon = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
    assert quiet_hours_end(late, start, end, UTC_ZONE) == datetime(2026, 3, 2, 7, 0, tzinfo=UTC)
    assert quiet_hours_end(early, start, end, UTC_ZONE) == datetime(2026, 3, 2, 7, 0, tzinfo=UTC)
    assert quiet_hours_end(noon, start, end, UTC_ZONE) is None


def test_next_local_time_across_a_dst_change():
    # Berlin moves to summer time on 2026-03-29; 09:00 local is 08:00 UTC before, 07:00 after.
    zone = ZoneInfo("Europe/Berlin")
    before = next_local_time(datetime(2026, 3, 28, 10, 0, tzinfo=UTC), time(9, 0), zone)
    assert before == datetime(2026, 3, 29, 7, 0, tzinfo=UTC)
    assert next_local_time(datetime(2026, 3, 27, 6, 0, tzinfo=UTC), time(9, 0), zone) == datetime(
        2026, 3, 27, 8, 0, tzinfo=UTC
    )
