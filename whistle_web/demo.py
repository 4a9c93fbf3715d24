"""Seed a demo organization so the console has something to show on first run."""

from __future__ import annotations

import random
from datetime import UTC, datetime, time, timedelta
from typing import Any

from sqlalchemy import select

from whistle_web.accounts.models import Role
from whistle_web.accounts.services import (
    add_member,
    create_api_key,
    create_user,
    find_user_by_email,
)
from whistle_web.channels.kinds import Channel, ProviderKind
from whistle_web.deliveries.failures import FailureReason
from whistle_web.deliveries.models import INBOX_SEQ
from whistle_web.deliveries.services import rebuild_stats
from whistle_web.deliveries.status import DeliveryStatus, SuppressionCause
from whistle_web.errors import Actor
from whistle_web.extensions import db
from whistle_web.message_templates.rendering import CompiledContent, RenderError, compile_content
from whistle_web.models import (
    AudienceType,
    Campaign,
    CampaignStatus,
    Category,
    Delivery,
    DeliveryEvent,
    Device,
    DeviceKind,
    Notification,
    Organization,
    Preference,
    Provider,
    Recipient,
    Segment,
    SendRequest,
    SendRequestKind,
    SendRequestStatus,
    StatScope,
    Subscription,
    Suppression,
    SuppressionReason,
    Template,
    TemplateVersion,
    Topic,
    VersionState,
)
from whistle_web.organizations.services import create_organization
from whistle_web.tenancy import organization_scope

DEMO_SLUG = "acme-demo"
DEMO_EMAIL = "demo@example.com"
DEMO_PASSWORD = "whistle-demo-2026"  # noqa: S105  (printed on purpose: it is the demo login)
EDITOR_EMAIL = "editor@example.com"

FIRST = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Ken", "Margaret", "Linus", "Radia", "Tim",
         "Frances", "Donald", "Hedy", "Dennis", "Katherine", "Guido", "Sophie", "John", "Annie", "Niklaus"]  # fmt: skip
LAST = ["Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Thompson", "Hamilton", "Torvalds",
        "Perlman", "Berners-Lee", "Allen", "Knuth", "Lamarr", "Ritchie", "Johnson", "van Rossum"]  # fmt: skip
ZONES = ["Europe/Berlin", "Europe/London", "America/New_York", "America/Los_Angeles",
         "Asia/Tokyo", "Australia/Sydney", "Europe/Paris", "America/Sao_Paulo"]  # fmt: skip
COUNTRIES = {"Europe/Berlin": "DE", "Europe/London": "GB", "America/New_York": "US",
             "America/Los_Angeles": "US", "Asia/Tokyo": "JP", "Australia/Sydney": "AU",
             "Europe/Paris": "FR", "America/Sao_Paulo": "BR"}  # fmt: skip
RECIPIENT_COUNT = 240


def demo_exists() -> bool:
    return (
        db.session.scalar(select(Organization.id).where(Organization.slug == DEMO_SLUG)) is not None
    )


def seed_demo(now: datetime | None = None) -> bool:
    """Create the demo organization unless it exists. Returns True when it was created."""
    if demo_exists():
        return False
    now = now or datetime.now(UTC)
    rng = random.Random(2026)
    try:
        org = create_organization("Acme Cloud (demo)", slug=DEMO_SLUG)
        owner = find_user_by_email(DEMO_EMAIL) or create_user(
            DEMO_EMAIL, DEMO_PASSWORD, name="Demo Owner"
        )
        editor = find_user_by_email(EDITOR_EMAIL) or create_user(
            EDITOR_EMAIL, DEMO_PASSWORD, name="Demo Editor"
        )
        actor = Actor("system", None, "whistle demo")
        with organization_scope(org.id):
            add_member(owner, Role.OWNER, actor=actor)
            add_member(editor, Role.EDITOR, actor=actor)
            create_api_key("Demo backend", actor=actor, created_by_id=owner.id)
            _seed_content(org, rng, now, owner.id)
        db.session.commit()
    except Exception:
        db.session.rollback()
        raise
    return True


def _seed_content(org: Organization, rng: random.Random, now: datetime, owner_id: int) -> None:
    org.settings = {
        "branding": {"brand_color": "#3b5bdb", "logo_text": "Acme Cloud"},
        "sender": {"from_email": "hello@acme.test", "from_name": "Acme Cloud"},
    }
    org.allowed_origins = ["http://127.0.0.1:5000", "http://localhost:5000"]

    categories = {
        c.key: c
        for c in [
            Category(key="security", name="Security alerts", critical=True,
                     default_channels=["email", "sms"]),
            Category(key="billing", name="Billing", default_channels=["email"]),
            Category(key="product-updates", name="Product updates",
                     default_channels=["email", "in_app"]),
            Category(key="marketing", name="Marketing", default_channels=["email", "push"]),
        ]
    }  # fmt: skip
    db.session.add_all(categories.values())
    topics = {
        "newsletter": Topic(key="newsletter", name="Monthly newsletter"),
        "release-notes": Topic(key="release-notes", name="Release notes"),
    }
    db.session.add_all(topics.values())

    recipients = []
    for i in range(1, RECIPIENT_COUNT + 1):
        first, last = rng.choice(FIRST), rng.choice(LAST)
        zone = rng.choice(ZONES)
        has_phone = rng.random() < 0.6
        recipients.append(
            Recipient(
                external_id=f"user_{i:04d}",
                name=f"{first} {last}",
                # Every 40th recipient has no email: the funnel shows "no address".
                email=None if i % 40 == 0 else f"{first}.{last}.{i}@example.com".lower(),
                phone=f"+1555{i:07d}" if has_phone else None,
                locale=rng.choice(["en", "en", "de", "fr", "ja"]),
                timezone=zone,
                quiet_hours_start=time(22, 0) if i % 7 == 0 else None,
                quiet_hours_end=time(7, 0) if i % 7 == 0 else None,
                unsubscribed_at=now - timedelta(days=20) if i % 80 == 3 else None,
                attributes={
                    "plan": rng.choice(["free", "free", "pro", "enterprise"]),
                    "country": COUNTRIES[zone],
                    "seats": rng.randint(1, 250),
                    "beta": rng.random() < 0.2,
                    "signed_up_at": (now - timedelta(days=rng.randint(1, 700))).date().isoformat(),
                },
                created_at=now - timedelta(days=rng.randint(10, 700)),
            )
        )
    db.session.add_all(recipients)
    db.session.flush()

    for r in recipients[::4]:
        db.session.add(
            Device(recipient_id=r.id, kind=DeviceKind.FCM, token=f"fcm-demo-token-{r.external_id}")
        )
    for r in recipients[1::12]:
        db.session.add(
            Device(
                recipient_id=r.id,
                kind=DeviceKind.WEBPUSH,
                token=f"https://push.example.test/send/{r.external_id}",
                data={"keys": {"p256dh": "demo-p256dh", "auth": "demo-auth"}},
            )
        )
    for r in recipients[:160]:
        db.session.add(Subscription(topic_id=topics["newsletter"].id, recipient_id=r.id))
    for r in recipients[100:180]:
        db.session.add(Subscription(topic_id=topics["release-notes"].id, recipient_id=r.id))
    for r in recipients[5:160:11]:
        db.session.add(
            Preference(
                recipient_id=r.id,
                category_id=categories["product-updates"].id,
                channel=Channel.EMAIL,
                enabled=False,
            )
        )
    for r in recipients[2:60:13]:
        db.session.add(Preference(recipient_id=r.id, channel=Channel.SMS, enabled=False))
    suppressed = [r for r in recipients[8:160:37] if r.email]
    for r, reason in zip(suppressed, [SuppressionReason.HARD_BOUNCE, SuppressionReason.COMPLAINT,
                                      SuppressionReason.HARD_BOUNCE, SuppressionReason.MANUAL],
                         strict=False):  # fmt: skip
        db.session.add(Suppression(channel=Channel.EMAIL, address=r.email, reason=reason))

    templates = _seed_templates(categories, owner_id, now)
    db.session.add(
        Segment(
            name="Paying customers in Europe",
            description="Pro and Enterprise plans in European countries.",
            rules={
                "op": "and",
                "rules": [
                    {"field": "attributes.plan", "operator": "in", "value": ["pro", "enterprise"]},
                    {"field": "attributes.country", "operator": "in", "value": ["DE", "GB", "FR"]},
                ],
            },
            created_by_id=owner_id,
        )
    )
    smtp = Provider(
        channel=Channel.EMAIL,
        kind=ProviderKind.SMTP,
        name="Local SMTP",
        settings={"host": "127.0.0.1", "port": 1025, "from_email": "hello@acme.test"},
        priority=10,
        rate_limit_per_second=50,
    )
    smtp.set_credentials({"username": "", "password": ""})
    in_app = Provider(channel=Channel.IN_APP, kind=ProviderKind.IN_APP, name="In-app inbox")
    in_app.set_credentials({})
    db.session.add_all([smtp, in_app])
    db.session.flush()
    providers = {Channel.EMAIL: smtp.id, Channel.IN_APP: in_app.id}

    digest = templates["weekly-digest"]
    completed = Campaign(
        name="October product update",
        status=CampaignStatus.COMPLETED,
        template_id=digest.id,
        template_version_id=digest.published_version_id,
        channels=["email", "in_app"],
        audience_type=AudienceType.TOPIC,
        topic_id=topics["newsletter"].id,
        launched_at=now - timedelta(days=3),
        completed_at=now - timedelta(days=3) + timedelta(minutes=4),
        created_by_id=owner_id,
    )
    paused = Campaign(
        name="Black Friday early access",
        status=CampaignStatus.PAUSED,
        template_id=digest.id,
        template_version_id=digest.published_version_id,
        channels=["email"],
        audience_type=AudienceType.TOPIC,
        topic_id=topics["release-notes"].id,
        launched_at=now - timedelta(hours=2),
        created_by_id=owner_id,
    )
    cancelled = Campaign(
        name="Webinar reminder (sent to the wrong list)",
        status=CampaignStatus.CANCELLED,
        template_id=digest.id,
        template_version_id=digest.published_version_id,
        channels=["email"],
        audience_type=AudienceType.LIST,
        audience_external_ids=[r.external_id for r in recipients[200:230]],
        launched_at=now - timedelta(days=1),
        cancelled_at=now - timedelta(days=1) + timedelta(minutes=1),
        created_by_id=owner_id,
    )
    scheduled = Campaign(
        name="December newsletter",
        status=CampaignStatus.SCHEDULED,
        template_id=digest.id,
        channels=["email", "push"],
        audience_type=AudienceType.TOPIC,
        topic_id=topics["newsletter"].id,
        send_at=now + timedelta(days=6),
        next_run_at=now + timedelta(days=6),
        created_by_id=owner_id,
    )
    draft = Campaign(
        name="Spring pricing change",
        status=CampaignStatus.DRAFT,
        template_id=digest.id,
        channels=["email"],
        audience_type=AudienceType.ALL,
        created_by_id=owner_id,
    )
    db.session.add_all([completed, paused, cancelled, scheduled, draft])
    db.session.flush()

    subscribed = recipients[:160]
    _send(completed, digest, subscribed, providers, rng, completed.launched_at, "completed")
    _send(paused, digest, recipients[100:180], providers, rng, paused.launched_at, "paused")
    _send(cancelled, digest, recipients[200:230], providers, rng, cancelled.launched_at,
          "cancelled")  # fmt: skip
    welcome = templates["welcome"]
    for day in range(7):
        newcomers = recipients[day * 6 : day * 6 + 6]
        _send(None, welcome, newcomers, providers, rng, now - timedelta(days=day, hours=3),
              "completed", channels=["email", "in_app"])  # fmt: skip

    db.session.flush()
    for campaign in (completed, paused, cancelled):
        campaign.audience_count = db.session.scalar(
            select(SendRequest.planned_count).where(SendRequest.campaign_id == campaign.id)
        )
        rebuild_stats(StatScope.CAMPAIGN, campaign.id)
    for template in templates.values():
        rebuild_stats(StatScope.TEMPLATE, template.id)
    rebuild_stats(StatScope.ORGANIZATION, org.id)


def _seed_templates(
    categories: dict[str, Category], owner_id: int, now: datetime
) -> dict[str, Template]:
    specs: list[tuple[str, str, str, list[dict[str, Any]]]] = [
        ("welcome", "Welcome", "product-updates", [{
            "email": {
                "subject": "Welcome to Acme Cloud, {{ recipient.name or 'there' }}!",
                "html": "<h1>Welcome aboard</h1><p>Hi {{ recipient.name or 'there' }}, your "
                        "{{ recipient.attributes.plan }} workspace is ready.</p>"
                        "<p><a href=\"https://acme.test/start\">Start the tour</a></p>",
                "text": "Hi {{ recipient.name or 'there' }}, your {{ recipient.attributes.plan }} "
                        "workspace is ready: https://acme.test/start",
            },
            "in_app": {"title": "Welcome to Acme Cloud", "body": "Take the two-minute tour.",
                       "action_url": "https://acme.test/start"},
        }]),
        ("weekly-digest", "Product update", "product-updates", [
            {"email": {"subject": "What's new at Acme", "html": "<p>Updates</p>",
                       "text": "Updates"}},
            {
                "email": {
                    "subject": "{{ data.month | default('This month') }} at Acme: what's new",
                    "html": "<h1>{{ data.headline | default('New features') }}</h1>"
                            "<p>Hi {{ recipient.name or 'there' }}, here is what shipped.</p>"
                            "<p><a href=\"https://acme.test/changelog\">Read the changelog</a></p>",
                    "text": "Hi {{ recipient.name or 'there' }}, here is what shipped: "
                            "https://acme.test/changelog",
                },
                "in_app": {"title": "{{ data.headline | default('New features') }}",
                           "body": "See what shipped this month.",
                           "action_url": "https://acme.test/changelog"},
                "push": {"title": "New at Acme", "body": "{{ data.headline | default('') }}"},
            },
        ]),
        ("password-reset", "Password reset", "security", [{
            "email": {"subject": "Reset your password",
                      "html": "<p><a href=\"{{ data.reset_url }}\">Reset your password</a>. "
                              "The link expires in 30 minutes.</p>",
                      "text": "Reset your password: {{ data.reset_url }} (expires in 30 minutes)"},
            "sms": {"text": "Acme: your reset code is {{ data.code }}. It expires in 30 min."},
        }]),
        ("invoice-ready", "Invoice ready", "billing", [{
            "email": {"subject": "Your invoice {{ data.invoice_number }}",
                      "html": "<p>Invoice {{ data.invoice_number }} for {{ data.amount }} is "
                              "ready.</p>",
                      "text": "Invoice {{ data.invoice_number }} for {{ data.amount }} is ready."},
        }]),
    ]  # fmt: skip
    templates: dict[str, Template] = {}
    for key, name, category, versions in specs:
        template = Template(key=key, name=name, category_id=categories[category].id)
        db.session.add(template)
        db.session.flush()
        last: TemplateVersion | None = None
        for number, content in enumerate(versions, start=1):
            last = TemplateVersion(
                template_id=template.id,
                version=number,
                content=content,
                state=VersionState.ARCHIVED,
                created_by_id=owner_id,
                created_at=now - timedelta(days=40 - number),
                published_at=now - timedelta(days=40 - number),
            )
            db.session.add(last)
        db.session.flush()
        assert last is not None
        if key == "invoice-ready":  # still a draft: never published
            last.state, last.published_at = VersionState.DRAFT, None
        else:
            last.state = VersionState.PUBLISHED
            template.published_version_id = last.id
        templates[key] = template
    db.session.flush()
    return templates


def _send(
    campaign: Campaign | None,
    template: Template,
    audience: list[Recipient],
    providers: dict[Channel, int],
    rng: random.Random,
    at: datetime | None,
    outcome: str,
    *,
    channels: list[str] | None = None,
) -> None:
    """Write a send request with its notifications, deliveries and events, as if sent."""
    assert at is not None
    channels = channels or (campaign.channels if campaign else ["email"])
    request = SendRequest(
        kind=SendRequestKind.CAMPAIGN if campaign else SendRequestKind.TRIGGER,
        status=SendRequestStatus.PLANNED if outcome != "cancelled" else SendRequestStatus.CANCELLED,
        campaign_id=campaign.id if campaign else None,
        template_id=template.id,
        template_version_id=template.published_version_id,
        audience={"type": "recipients", "ids": [r.id for r in audience]},
        channels=channels,
        send_at=at,
        created_at=at,
        planned_at=at + timedelta(seconds=5),
        planned_count=len(audience),
        cursor_recipient_id=max(r.id for r in audience),
        actor="demo",
    )
    db.session.add(request)
    db.session.flush()
    suppressed_addresses = set(db.session.scalars(select(Suppression.address)))
    version = db.session.get(TemplateVersion, template.published_version_id)
    compiled = compile_content(version.content if version else {})
    organization_name = db.session.get(Organization, template.organization_id).name
    for index, recipient in enumerate(audience):
        notification = Notification(
            send_request_id=request.id,
            campaign_id=campaign.id if campaign else None,
            template_id=template.id,
            category_id=template.category_id,
            recipient_id=recipient.id,
            created_at=at,
        )
        db.session.add(notification)
        db.session.flush()
        for channel in channels:
            status, reason = _outcome(channel, recipient, suppressed_addresses, outcome, index, rng)
            delivery = Delivery(
                notification_id=notification.id,
                recipient_id=recipient.id,
                campaign_id=notification.campaign_id,
                template_id=template.id,
                channel=Channel(channel),
                provider_id=providers.get(Channel(channel)),
                address=recipient.email if channel == "email" else recipient.external_id,
                created_at=at,
            )
            _apply(delivery, status, reason, at, rng)
            if delivery.sent_at is not None:
                # What the widget and the recipient's story show: the message as sent.
                delivery.rendered = _rendered(compiled, channel, recipient, organization_name)
                if channel == Channel.IN_APP:
                    delivery.inbox_seq = db.session.scalar(INBOX_SEQ.next_value())
            db.session.add(delivery)
            db.session.flush()
            _events(delivery)


def _rendered(
    compiled: CompiledContent, channel: str, recipient: Recipient, organization_name: str
) -> dict[str, Any] | None:
    from whistle_web.deliveries.dispatch import recipient_context

    context = {
        "recipient": recipient_context(recipient),
        "data": {},
        "organization": {"name": organization_name},
        "unsubscribe_url": "",
        "preferences_url": "",
    }
    try:
        return compiled.render(channel, context) or None
    except RenderError:
        return None


def _outcome(
    channel: str,
    recipient: Recipient,
    suppressed: set[str],
    outcome: str,
    index: int,
    rng: random.Random,
) -> tuple[DeliveryStatus, SuppressionCause | None]:
    if recipient.unsubscribed_at is not None:
        return DeliveryStatus.SUPPRESSED, SuppressionCause.UNSUBSCRIBED
    if channel == "email" and recipient.email is None:
        return DeliveryStatus.SUPPRESSED, SuppressionCause.NO_ADDRESS
    if channel == "email" and recipient.email in suppressed:
        return DeliveryStatus.SUPPRESSED, SuppressionCause.SUPPRESSION_LIST
    if channel == "email" and index % 11 == 5:
        return DeliveryStatus.SUPPRESSED, SuppressionCause.PREFERENCE
    if channel == "email" and index % 53 == 17:
        return DeliveryStatus.SUPPRESSED, SuppressionCause.FREQUENCY_CAP
    if outcome == "cancelled":
        return (DeliveryStatus.SENT, None) if index < 8 else (DeliveryStatus.CANCELLED, None)
    if outcome == "paused" and index >= 30:
        return DeliveryStatus.QUEUED, None
    roll = rng.random()
    if channel == "email":
        if roll < 0.03:
            return DeliveryStatus.FAILED, None
        if roll < 0.06:
            return DeliveryStatus.BOUNCED, None
        ladder = [(0.15, DeliveryStatus.SENT), (0.5, DeliveryStatus.DELIVERED),
                  (0.75, DeliveryStatus.SEEN), (0.88, DeliveryStatus.READ)]  # fmt: skip
    else:
        ladder = [(0.1, DeliveryStatus.SENT), (0.3, DeliveryStatus.DELIVERED),
                  (0.6, DeliveryStatus.SEEN), (0.85, DeliveryStatus.READ)]  # fmt: skip
    for threshold, status in ladder:
        if roll < threshold:
            return status, None
    return DeliveryStatus.CLICKED, None


_PROGRESS_TIMES = [
    (DeliveryStatus.SENT, "sent_at", 5),
    (DeliveryStatus.DELIVERED, "delivered_at", 30),
    (DeliveryStatus.SEEN, "seen_at", 3600),
    (DeliveryStatus.READ, "read_at", 3700),
    (DeliveryStatus.CLICKED, "clicked_at", 3900),
]


def _apply(
    delivery: Delivery,
    status: DeliveryStatus,
    reason: SuppressionCause | None,
    at: datetime,
    rng: random.Random,
) -> None:
    delivery.status = status
    delivery.suppression_reason = reason
    if status == DeliveryStatus.FAILED:
        delivery.error = "550 5.1.1 mailbox unavailable"
        delivery.failure_reason = FailureReason.PROVIDER_REJECTED
        delivery.failed_at = at + timedelta(seconds=6)
        delivery.attempts = 1
        return
    if status in (DeliveryStatus.SUPPRESSED, DeliveryStatus.QUEUED, DeliveryStatus.CANCELLED):
        return
    delivery.attempts = 1
    delivery.provider_message_id = f"demo-{rng.getrandbits(64):016x}"
    if status == DeliveryStatus.BOUNCED:
        delivery.sent_at = at + timedelta(seconds=5)
        delivery.bounced_at = at + timedelta(seconds=40)
        delivery.error = "hard bounce: address does not exist"
        delivery.failure_reason = FailureReason.HARD_BOUNCE
        return
    rank = [s for s, _, _ in _PROGRESS_TIMES].index(status)
    for _, attr, offset in _PROGRESS_TIMES[: rank + 1]:
        setattr(delivery, attr, at + timedelta(seconds=offset + rng.randint(0, 900)))


def _events(delivery: Delivery) -> None:
    stamps = [("queued", delivery.created_at)]
    for status, attr in [
        ("sent", "sent_at"),
        ("delivered", "delivered_at"),
        ("seen", "seen_at"),
        ("read", "read_at"),
        ("clicked", "clicked_at"),
        ("failed", "failed_at"),
        ("bounced", "bounced_at"),
    ]:
        if getattr(delivery, attr) is not None:
            stamps.append((status, getattr(delivery, attr)))
    if delivery.status in (DeliveryStatus.SUPPRESSED, DeliveryStatus.CANCELLED):
        stamps = [(delivery.status.value, delivery.created_at)]
    for event_type, occurred_at in stamps:
        data: dict[str, Any] = {}
        if event_type == "suppressed":
            data["reason"] = str(delivery.suppression_reason)
        if event_type in ("failed", "bounced"):
            data["error"] = delivery.error
        if event_type == "clicked":
            data["url"] = "https://acme.test/changelog"
        db.session.add(
            DeliveryEvent(
                delivery_id=delivery.id, type=event_type, occurred_at=occurred_at, data=data
            )
        )
