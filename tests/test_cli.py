"""``whistle bootstrap`` and ``whistle demo``."""

from __future__ import annotations

import json

from sqlalchemy import func, select

from whistle_web.accounts.services import authenticate, resolve_api_key
from whistle_web.channels.kinds import Channel
from whistle_web.deliveries.services import funnel
from whistle_web.deliveries.status import DeliveryStatus, SuppressionCause
from whistle_web.demo import DEMO_EMAIL, DEMO_PASSWORD, DEMO_SLUG
from whistle_web.extensions import db
from whistle_web.models import (
    Campaign,
    CampaignStatus,
    Delivery,
    DeliveryEvent,
    Membership,
    Organization,
    Role,
    StatScope,
)
from whistle_web.tenancy import organization_scope, unscoped


def _bootstrap(runner, *extra):
    return runner.invoke(
        args=[
            "whistle", "bootstrap", "--org", "Initech", "--email", "Peter@Initech.example.com",
            "--password", "tps-reports-2026", *extra,
        ]
    )  # fmt: skip


def test_bootstrap_prints_an_org_and_a_working_api_key(runner):
    result = _bootstrap(runner)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    key = resolve_api_key(payload["api_key"])
    assert key is not None and key.organization_id == payload["organization_id"]
    user = authenticate("peter@initech.example.com", "tps-reports-2026")
    assert user is not None
    with organization_scope(payload["organization_id"]):
        membership = db.session.scalar(select(Membership).where(Membership.user_id == user.id))
    assert membership.role == Role.OWNER


def test_bootstrap_twice_is_a_clear_error_and_writes_nothing(runner):
    assert _bootstrap(runner).exit_code == 0
    orgs = db.session.scalar(select(func.count()).select_from(Organization))
    result = _bootstrap(runner)
    assert result.exit_code == 1
    assert "already taken" in result.output
    assert db.session.scalar(select(func.count()).select_from(Organization)) == orgs


def test_bootstrap_rejects_bad_input(runner):
    result = runner.invoke(
        args=["whistle", "bootstrap", "--org", "X", "--email", "nope", "--password", "p"]
    )
    assert result.exit_code == 1
    assert "email" in result.output
    assert db.session.scalar(select(func.count()).select_from(Organization)) == 0


def test_bootstrap_refuses_an_existing_user_with_another_password(runner, make_user):
    make_user("peter@initech.example.com")
    result = _bootstrap(runner)
    assert result.exit_code == 1
    assert "password does not match" in result.output
    assert db.session.scalar(select(func.count()).select_from(Organization)) == 0


def test_demo_seeds_once_with_deliveries_in_every_state(runner):
    first = runner.invoke(args=["whistle", "demo"])
    assert first.exit_code == 0, first.output
    assert f"{DEMO_EMAIL} / {DEMO_PASSWORD}" in first.output
    second = runner.invoke(args=["whistle", "demo"])
    assert "already present" in second.output
    assert authenticate(DEMO_EMAIL, DEMO_PASSWORD) is not None

    org = db.session.scalar(select(Organization).where(Organization.slug == DEMO_SLUG))
    with organization_scope(org.id):
        statuses = set(db.session.scalars(select(Delivery.status).distinct()))
        # "sending" only exists while a worker holds a delivery; everything else is shown.
        assert statuses == set(DeliveryStatus) - {DeliveryStatus.SENDING}
        reasons = set(db.session.scalars(select(Delivery.suppression_reason).distinct()))
        assert reasons - {None} == set(SuppressionCause) - {SuppressionCause.DUPLICATE}
        assert db.session.scalar(select(func.count()).select_from(DeliveryEvent)) > 0
        # Sent messages carry what was sent; in-app items are numbered for the widget.
        inbox = db.session.execute(
            select(Delivery.rendered, Delivery.inbox_seq).where(
                Delivery.channel == Channel.IN_APP, Delivery.sent_at.is_not(None)
            )
        ).all()
        assert inbox and all(r.rendered and r.rendered.get("title") for r in inbox)
        assert all(r.inbox_seq for r in inbox)
        assert len({r.inbox_seq for r in inbox}) == len(inbox)
        campaign = db.session.scalar(
            select(Campaign).where(Campaign.status == CampaignStatus.COMPLETED)
        )
        counts = funnel(StatScope.CAMPAIGN, campaign.id)["all"]
        ledger = dict(
            db.session.execute(
                select(Delivery.status, func.count())
                .where(Delivery.campaign_id == campaign.id)
                .group_by(Delivery.status)
            ).all()
        )
    # The seeded counters agree with the ledger.
    assert counts["targeted"] == sum(ledger.values())
    assert counts["suppressed"] == ledger[DeliveryStatus.SUPPRESSED]
    assert counts["clicked"] == ledger[DeliveryStatus.CLICKED]
    assert counts["read"] == ledger[DeliveryStatus.READ] + ledger[DeliveryStatus.CLICKED]
    assert counts["sent"] == sum(
        n for s, n in ledger.items() if s not in {DeliveryStatus.SUPPRESSED, DeliveryStatus.FAILED}
    )
    assert db.session.scalar(unscoped(select(func.count()).select_from(Organization))) == 1
