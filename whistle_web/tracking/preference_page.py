"""The hosted preference page a recipient reaches from any email or from the widget.

``/p/<token>`` carries a signed preferences token (:func:`links.preferences_url`) naming the
organization and the recipient; everything below runs inside that organization's scope and
trusts nothing else from the request. The page is a plain HTML form (no JavaScript): a
matrix of categories × channels, topics, quiet hours with a time zone, and unsubscribe from
everything (or resubscribe). Critical categories are shown, locked on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import time
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from flask import Blueprint, Response, current_app, flash, redirect, render_template, request
from sqlalchemy import select
from werkzeug.datastructures import MultiDict

from whistle_web.audiences import services as audiences
from whistle_web.audiences.models import Subscription, Topic
from whistle_web.channels.kinds import Channel
from whistle_web.errors import Actor, DomainError
from whistle_web.extensions import db
from whistle_web.organizations.models import Organization
from whistle_web.organizations.services import record_audit
from whistle_web.preferences import services as preferences
from whistle_web.preferences.models import Category
from whistle_web.recipients.models import Recipient
from whistle_web.tenancy import organization_scope
from whistle_web.tracking import links
from whistle_web.tracking.views import _invalid_link, _private

bp = Blueprint("preference_page", __name__)

PREFERENCE_PAGE_ACTOR = Actor.system("preference page")
# The channels a person receives messages on (webhooks go to the customer's systems).
CHANNEL_LABELS: dict[str, str] = {
    Channel.EMAIL.value: "Email",
    Channel.SMS.value: "SMS",
    Channel.PUSH.value: "Push",
    Channel.IN_APP.value: "In-app",
}
_TIME = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)(:[0-5]\d)?$")
MAX_TIMEZONE_LENGTH = 64  # Recipient.timezone


@lru_cache(maxsize=1)
def timezone_names() -> tuple[str, ...]:
    """Every IANA zone name this system knows, sorted (offered as suggestions)."""
    return tuple(sorted(available_timezones()))


# --- what the page shows ----------------------------------------------------------------------


@dataclass
class CategoryRow:
    id: int
    key: str
    name: str
    description: str
    critical: bool
    channels: dict[str, bool]


@dataclass
class TopicRow:
    id: int
    key: str
    name: str
    description: str
    subscribed: bool


@dataclass
class PageState:
    """The form's values: loaded from the database, or as submitted."""

    categories: list[CategoryRow]
    topics: list[TopicRow]
    quiet_start: str
    quiet_end: str
    timezone: str
    unsubscribed: bool
    errors: dict[str, str] = field(default_factory=dict)


def load_state(recipient: Recipient) -> PageState:
    """The recipient's current choices, in the current organization."""
    effective = {
        c["key"]: c["channels"]
        for c in preferences.get_preferences(recipient.external_id)["categories"]
    }
    categories = db.session.scalars(select(Category).order_by(Category.name, Category.id)).all()
    subscribed = set(
        db.session.scalars(
            select(Subscription.topic_id).where(Subscription.recipient_id == recipient.id)
        )
    )
    topics = db.session.scalars(select(Topic).order_by(Topic.name, Topic.id)).all()
    return PageState(
        categories=[
            CategoryRow(
                id=c.id,
                key=c.key,
                name=c.name,
                description=c.description,
                critical=c.critical,
                channels={
                    ch: True if c.critical else bool(effective.get(c.key, {}).get(ch, True))
                    for ch in CHANNEL_LABELS
                },
            )
            for c in categories
        ],
        topics=[
            TopicRow(
                id=t.id,
                key=t.key,
                name=t.name,
                description=t.description,
                subscribed=t.id in subscribed,
            )
            for t in topics
        ],
        quiet_start=_format_time(recipient.quiet_hours_start),
        quiet_end=_format_time(recipient.quiet_hours_end),
        timezone=recipient.timezone or "",
        unsubscribed=recipient.unsubscribed_at is not None,
    )


def _format_time(value: time | None) -> str:
    return value.strftime("%H:%M") if value is not None else ""


# --- reading the form -------------------------------------------------------------------------


@dataclass(frozen=True)
class Choices:
    """What a valid form asks for."""

    categories: dict[str, dict[str, bool]]
    topics: dict[str, bool]
    quiet_hours: tuple[time, time] | None
    timezone: str | None


def _parse_time(text: str) -> time | None:
    match = _TIME.match(text)
    if match is None:
        return None
    return time(int(match.group(1)), int(match.group(2)))


def _valid_timezone(name: str) -> bool:
    if len(name) > MAX_TIMEZONE_LENGTH or "\x00" in name:
        return False
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def read_form(form: MultiDict[str, str], shown: PageState) -> tuple[PageState, Choices | None]:
    """Apply a submitted form to the page it was shown on.

    A checkbox that is missing from the form is off (browsers send only checked ones); the
    boxes of critical categories are never read. Returns the page as submitted (with
    ``errors`` by field name) and the choices, or None when anything is invalid.
    """
    errors: dict[str, str] = {}
    # Only rows the form showed are read: a category or topic added while the page was
    # open has no boxes in it, which must not read as "off".
    on_form = set(form.getlist("shown"))
    categories: dict[str, dict[str, bool]] = {}
    rows = []
    for row in shown.categories:
        if row.critical or f"category-{row.id}" not in on_form:
            rows.append(row)
            continue
        channels = {ch: form.get(f"category-{row.id}-{ch}") == "on" for ch in CHANNEL_LABELS}
        categories[row.key] = channels
        rows.append(CategoryRow(row.id, row.key, row.name, row.description, False, channels))
    topics = {
        t.key: form.get(f"topic-{t.id}") == "on" for t in shown.topics if f"topic-{t.id}" in on_form
    }
    topic_rows = [
        TopicRow(t.id, t.key, t.name, t.description, topics.get(t.key, t.subscribed))
        for t in shown.topics
    ]

    start_text = (form.get("quiet_start") or "").strip()
    end_text = (form.get("quiet_end") or "").strip()
    quiet_hours: tuple[time, time] | None = None
    start, end = _parse_time(start_text), _parse_time(end_text)
    if start_text and start is None:
        errors["quiet_start"] = "Use a time like 22:00."
    if end_text and end is None:
        errors["quiet_end"] = "Use a time like 07:00."
    if not errors and bool(start_text) != bool(end_text):
        errors["quiet_end" if start_text else "quiet_start"] = (
            "Give both a start and an end, or leave both empty."
        )
    if start is not None and end is not None:
        if start == end:
            errors["quiet_end"] = "The end must differ from the start."
        quiet_hours = (start, end)

    timezone = (form.get("timezone") or "").strip()
    if timezone and not _valid_timezone(timezone):
        errors["timezone"] = "Not a known time zone. Choose one like Europe/Berlin."

    submitted = PageState(
        categories=rows,
        topics=topic_rows,
        quiet_start=start_text,
        quiet_end=end_text,
        timezone=timezone,
        unsubscribed=shown.unsubscribed,
        errors=errors,
    )
    if errors:
        return submitted, None
    return submitted, Choices(categories, topics, quiet_hours, timezone or None)


# --- saving -----------------------------------------------------------------------------------


def save_choices(recipient: Recipient, shown: PageState, choices: Choices, *, actor: Actor) -> None:
    """Write the choices of the preference page for a recipient of the current organization.

    Only what differs from ``shown`` is written, each change through its domain service
    (which records the audit entry). Commits.

    Raises:
        ValidationError, NotFound: a category or topic changed while the page was open.
    """
    preferences.update_preferences(
        recipient.external_id,
        quiet_hours=choices.quiet_hours,
        categories=[{"key": key, "channels": chs} for key, chs in choices.categories.items()],
        actor=actor,
    )
    if choices.timezone != recipient.timezone:
        record_audit(
            actor,
            "recipient.updated",
            "recipient",
            recipient.id,
            {"timezone": choices.timezone},
        )
        recipient.timezone = choices.timezone
        db.session.commit()
    was = {t.key: t.subscribed for t in shown.topics}
    for key, wanted in choices.topics.items():
        if wanted == was.get(key):
            continue
        if wanted:
            audiences.subscribe(key, [recipient.external_id], actor=actor)
        else:
            audiences.unsubscribe(key, [recipient.external_id], actor=actor)


# --- views ------------------------------------------------------------------------------------


def _recipient(payload: links.LinkPayload) -> Recipient | None:
    """The recipient the token names, looked up inside the token's organization only."""
    return db.session.scalar(select(Recipient).where(Recipient.id == payload.recipient_id))


def _page(recipient: Recipient, state: PageState, *, status: int = 200) -> Response:
    organization = db.session.get(Organization, recipient.organization_id)
    html = render_template(
        "tracking/preferences.html",
        organization_name=organization.name if organization else "the sender",
        recipient=recipient,
        state=state,
        channel_labels=CHANNEL_LABELS,
        timezone_names=timezone_names(),
    )
    return _private(Response(html, status))


def _payload(token: str) -> links.LinkPayload | None:
    payload = links.verify_preferences(token, secret=current_app.config["SECRET_KEY"])
    if payload is None or payload.recipient_id is None:
        return None
    return payload


@bp.get("/p/<token>")
def page(token: str) -> Response:
    """Show the recipient's preferences."""
    payload = _payload(token)
    if payload is None:
        return _invalid_link()
    with organization_scope(payload.organization_id):
        recipient = _recipient(payload)
        if recipient is None:
            return _invalid_link()
        return _page(recipient, load_state(recipient))


@bp.post("/p/<token>")
def save(token: str) -> Response | Any:
    """Save the form, or unsubscribe from (resubscribe to) everything.

    The CSRF token is checked before this runs (a failed check sends the person back to
    the page with a message).
    """
    payload = _payload(token)
    if payload is None:
        return _invalid_link()
    with organization_scope(payload.organization_id):
        recipient = _recipient(payload)
        if recipient is None:
            return _invalid_link()
        action = request.form.get("action", "save")
        if action in ("unsubscribe", "resubscribe"):
            preferences.update_preferences(
                recipient.external_id,
                unsubscribed=action == "unsubscribe",
                actor=PREFERENCE_PAGE_ACTOR,
            )
            if action == "unsubscribe":
                flash("You are unsubscribed from all messages except essential ones.", "info")
            else:
                flash("You are subscribed again.", "info")
            return _private(redirect(request.path, 303))
        if action != "save":
            flash("That action is not known. Nothing was changed.", "error")
            return _private(redirect(request.path, 303))

        shown = load_state(recipient)
        submitted, choices = read_form(request.form, shown)
        if choices is None:
            return _page(recipient, submitted, status=422)
        try:
            save_choices(recipient, shown, choices, actor=PREFERENCE_PAGE_ACTOR)
        except DomainError as exc:  # a category or topic changed meanwhile
            db.session.rollback()
            current = load_state(recipient)
            current.errors["form"] = (
                f"Something changed while this page was open ({exc.detail}). "
                "Please check your choices and save again."
            )
            return _page(recipient, current, status=409)
        flash("Your preferences are saved.", "info")
        return _private(redirect(request.path, 303))
