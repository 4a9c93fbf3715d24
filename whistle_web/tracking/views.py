"""Public tracking endpoints: open pixel, click redirect, unsubscribe, provider webhooks.

Nothing here has a signed-in user. The links carry signed tokens naming their organization
(see :mod:`whistle_web.tracking.links`); the webhooks name a provider whose row says which
organization it belongs to and holds the secrets that authenticate the callback. Every
database access then runs inside that organization's scope.
"""

from __future__ import annotations

import base64
import json
import logging
from datetime import UTC, datetime
from typing import Any

import httpx
from flask import (
    Blueprint,
    Response,
    current_app,
    jsonify,
    redirect,
    render_template,
    request,
)
from sqlalchemy import select
from werkzeug.exceptions import RequestEntityTooLarge

from whistle_web.api.problems import problem
from whistle_web.channels.kinds import Channel, ProviderKind
from whistle_web.channels.models import Provider
from whistle_web.deliveries.ledger import record_event
from whistle_web.deliveries.models import Delivery
from whistle_web.errors import Actor
from whistle_web.extensions import csrf, db
from whistle_web.organizations.models import Organization
from whistle_web.organizations.services import record_audit
from whistle_web.recipients.models import Recipient
from whistle_web.tenancy import organization_scope, unscoped
from whistle_web.tracking import links, sns, twilio_signature

log = logging.getLogger(__name__)

bp = Blueprint("tracking", __name__)

# 1×1 transparent GIF.
TRANSPARENT_GIF = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
# SNS messages are at most 256 KiB; Twilio callbacks are a few hundred bytes.
MAX_WEBHOOK_BYTES = 512 * 1024
# SNS delivers at least once: remember message ids this long to apply each only once.
SNS_DEDUP_SECONDS = 2 * 24 * 3600
UNSUBSCRIBE_ACTOR = Actor.system("unsubscribe link")
# Twilio error codes that mean the number itself cannot receive messages.
TWILIO_PERMANENT_ERRORS = frozenset({"21211", "21610", "21614", "30003", "30005", "30006"})


def _secret() -> str:
    return current_app.config["SECRET_KEY"]


def _private(response: Response) -> Response:
    """Headers for pages reached through a personal link: not cached, not indexed, and the
    link (the token) never sent to other sites. Same-origin requests keep the referrer,
    which Flask-WTF's strict check wants on HTTPS form posts.
    """
    response.headers["Cache-Control"] = "no-store"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["X-Robots-Tag"] = "noindex"
    return response


def _invalid_link() -> Response:
    response = Response(render_template("tracking/invalid.html"), 404)
    return _private(response)


# --- open pixel and click redirect ------------------------------------------------------------


@bp.get("/t/o/<token>.gif")
def open_pixel(token: str) -> Response:
    """The open pixel: always the same image, so it says nothing about the token."""
    payload = links.verify_open(token, secret=_secret())
    # HEAD requests come from link scanners and prefetchers, not from people.
    if payload is not None and payload.delivery_id is not None and request.method == "GET":
        with organization_scope(payload.organization_id):
            record_event(payload.delivery_id, "opened")
            db.session.commit()
    response = Response(TRANSPARENT_GIF, mimetype="image/gif")
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/t/c/<token>")
def click(token: str) -> Response:
    """Record a click and redirect to the target signed into the token (never another)."""
    payload = links.verify_click(token, secret=_secret())
    if payload is None or payload.url is None or payload.delivery_id is None:
        return _invalid_link()
    if request.method == "GET":
        with organization_scope(payload.organization_id):
            record_event(payload.delivery_id, "clicked", data={"url": payload.url})
            db.session.commit()
    response = redirect(payload.url, 302)
    response.headers["Cache-Control"] = "no-store"
    return response


# --- unsubscribe ------------------------------------------------------------------------------


def unsubscribe_recipient(
    recipient_id: int, delivery_id: int | None, *, at: datetime, one_click: bool
) -> bool | None:
    """Globally unsubscribe a recipient of the current organization.

    Records an ``unsubscribed`` event on the delivery the link came from, and an audit entry,
    only when this call changed something (a repeated one-click POST counts once).

    Returns:
        True when the recipient was unsubscribed now, False when already unsubscribed, None
        when no such recipient exists in the current organization. Commits nothing.
    """
    recipient = db.session.scalar(
        select(Recipient).where(Recipient.id == recipient_id).with_for_update()
    )
    if recipient is None:
        return None
    if recipient.unsubscribed_at is not None:
        return False
    recipient.unsubscribed_at = at
    if delivery_id is not None:
        record_event(delivery_id, "unsubscribed", at=at, data={"one_click": one_click})
    record_audit(
        UNSUBSCRIBE_ACTOR,
        "recipient.unsubscribed",
        "recipient",
        recipient.id,
        {"delivery_id": delivery_id, "one_click": one_click},
    )
    return True


def _unsubscribe_page(organization_id: int, recipient_id: int, *, done: bool) -> Response:
    organization = db.session.get(Organization, organization_id)
    html = render_template(
        "tracking/unsubscribe.html",
        organization_name=organization.name if organization else "the sender",
        done=done,
        # A path: the page links to its own host, whatever the configured base URL says.
        preferences_url=links.preferences_url("", _secret(), organization_id, recipient_id),
    )
    return _private(Response(html))


@bp.get("/t/u/<token>")
def unsubscribe_form(token: str) -> Response:
    payload = links.verify_unsubscribe(token, secret=_secret())
    if payload is None or payload.recipient_id is None:
        return _invalid_link()
    with organization_scope(payload.organization_id):
        recipient = db.session.get(Recipient, payload.recipient_id)
        if recipient is None:
            return _invalid_link()
        return _unsubscribe_page(
            payload.organization_id, recipient.id, done=recipient.unsubscribed_at is not None
        )


def _is_one_click() -> bool:
    """The RFC 8058 body, and nothing else: ``List-Unsubscribe=One-Click``."""
    if request.files:
        return False
    return list(request.form.items(multi=True)) == [("List-Unsubscribe", "One-Click")]


@bp.post("/t/u/<token>")
def unsubscribe(token: str) -> Response:
    """Confirm the unsubscribe form, or accept a mail provider's one-click POST.

    This view is exempt from the automatic CSRF check (``init_app``); it checks the form's
    token itself unless the request is a one-click POST with a valid link token, which mail
    providers send without cookies or a form token.
    """
    payload = links.verify_unsubscribe(token, secret=_secret())
    if payload is None or payload.recipient_id is None:
        return _invalid_link()
    one_click = _is_one_click()
    if not one_click and current_app.config.get("WTF_CSRF_ENABLED", True):
        csrf.protect()  # raises CSRFError: the form is sent back with a message
    with organization_scope(payload.organization_id):
        changed = unsubscribe_recipient(
            payload.recipient_id,
            payload.delivery_id,
            at=datetime.now(UTC),
            one_click=one_click,
        )
        if changed is None:
            return _invalid_link()
        db.session.commit()
        if one_click:
            return _private(Response("Unsubscribed.\n", 200, mimetype="text/plain"))
        return _unsubscribe_page(payload.organization_id, payload.recipient_id, done=True)


# --- provider webhooks ------------------------------------------------------------------------


def _provider(provider_id: int, kind: ProviderKind) -> Provider | None:
    """The provider a callback URL names, looked up across organizations on purpose."""
    provider = db.session.scalar(unscoped(select(Provider).where(Provider.id == provider_id)))
    if provider is None or provider.kind != kind:
        return None
    return provider


def _read_body() -> bytes | None:
    request.max_content_length = MAX_WEBHOOK_BYTES
    try:
        return request.get_data()
    except RequestEntityTooLarge:
        return None


def _apply(
    channel: Channel,
    message_id: str,
    event_type: str,
    *,
    at: datetime | None = None,
    data: dict[str, Any] | None = None,
    addresses: frozenset[str] = frozenset(),
) -> int:
    """Record an event on the deliveries with this provider message id; returns how many."""
    rows = db.session.execute(
        select(Delivery.id, Delivery.address)
        .where(Delivery.provider_message_id == message_id, Delivery.channel == channel)
        .order_by(Delivery.id)
    ).all()
    applied = 0
    for delivery_id, address in rows:
        # A message to several addresses: apply a bounce or complaint to those it names.
        if addresses and address and address.strip().lower() not in addresses:
            continue
        record_event(delivery_id, event_type, at=at, data=dict(data or {}))
        applied += 1
    return applied


def _topic_allowed(provider: Provider, topic_arn: Any) -> bool:
    """When the provider lists its SNS topics, accept messages from those topics only."""
    allowed = provider.settings.get("sns_topic_arns") or provider.settings.get("sns_topic_arn")
    if not allowed:
        return True
    if isinstance(allowed, str):
        allowed = [allowed]
    return topic_arn in allowed


@bp.post("/hooks/ses/<int:provider_id>")
def ses_webhook(provider_id: int) -> Response:
    """Amazon SNS notifications carrying SES events (delivery, bounce, complaint, ...)."""
    provider = _provider(provider_id, ProviderKind.SES)
    if provider is None:
        return problem(404, "No SES provider with this id.")
    body = _read_body()
    if body is None:
        return problem(413, "The message is too large.")
    try:
        message = json.loads(body)
    except ValueError:
        message = None
    if not isinstance(message, dict):
        return problem(400, "The body is not an SNS message.")
    try:
        sns.verify_message(
            message,
            cert_url_pattern=current_app.config["WHISTLE_SNS_CERT_URL_PATTERN"],
        )
    except sns.CertificateUnavailable as exc:
        log.warning("SNS certificate unavailable for provider %s: %s", provider_id, exc)
        return problem(503, "The signing certificate could not be fetched; try again.")
    except sns.SnsVerificationError as exc:
        log.warning("rejected SNS message for provider %s: %s", provider_id, exc)
        return problem(403, f"Invalid SNS message: {exc}.")
    if not _topic_allowed(provider, message.get("TopicArn")):
        return problem(403, "This topic is not configured for the provider.")

    kind = message["Type"]
    if kind == sns.SUBSCRIPTION_CONFIRMATION:
        try:
            sns.confirm_subscription(
                message,
                subscribe_url_pattern=current_app.config["WHISTLE_SNS_SUBSCRIBE_URL_PATTERN"],
            )
        except sns.SnsVerificationError as exc:
            return problem(403, f"Invalid SNS message: {exc}.")
        except httpx.HTTPError as exc:
            log.warning("SNS subscription confirmation failed: %s", exc)
            return problem(502, "The subscription could not be confirmed.")
        log.info("confirmed SNS subscription %s for provider %s", message["TopicArn"], provider_id)
        return jsonify(status="confirmed")
    if kind != sns.NOTIFICATION:
        return jsonify(status="ignored")

    event = sns.parse_ses_event(message["Message"])
    if event is None:
        return jsonify(status="ignored")
    from whistle_web import get_redis

    redis = get_redis()
    seen_key = f"whistle:sns:seen:{provider.id}:{message['MessageId']}"
    if not redis.set(seen_key, 1, nx=True, ex=SNS_DEDUP_SECONDS):
        return jsonify(status="duplicate")
    try:
        with organization_scope(provider.organization_id):
            applied = _apply(
                Channel.EMAIL,
                event.message_id,
                event.event_type,
                at=event.at,
                data=event.data,
                addresses=event.addresses,
            )
            db.session.commit()
    except Exception:
        redis.delete(seen_key)  # let SNS's retry apply it
        raise
    return jsonify(status="ok", applied=applied)


def _external_url() -> str:
    """The URL Twilio requested, as seen from outside (behind a proxy or a tunnel)."""
    url = current_app.config["WHISTLE_BASE_URL"].rstrip("/") + request.path
    if request.query_string:
        url += "?" + request.query_string.decode("utf-8", "replace")
    return url


def twilio_event(status: str, error_code: str) -> tuple[str, dict[str, Any]] | None:
    """Map a Twilio ``MessageStatus`` to a ledger event and its data; None to ignore it."""
    if status == "delivered":
        return "delivered", {}
    if status == "read":
        return "read", {}
    if status in ("undelivered", "failed"):
        data: dict[str, Any] = {"twilio_status": status}
        if error_code:
            data["error_code"] = error_code
        if error_code in TWILIO_PERMANENT_ERRORS:
            return "bounced", {**data, "bounce_type": "permanent"}
        return "soft_bounce", {**data, "bounce_type": "transient"}
    return None  # queued, sending, sent, accepted, scheduled, ...


@bp.post("/hooks/twilio/<int:provider_id>")
def twilio_webhook(provider_id: int) -> Response:
    """Twilio message status callbacks, authenticated by ``X-Twilio-Signature``."""
    provider = _provider(provider_id, ProviderKind.TWILIO)
    if provider is None:
        return problem(404, "No Twilio provider with this id.")
    if _read_body() is None:
        return problem(413, "The request is too large.")
    auth_token = provider.get_credentials().get("auth_token")
    signature = request.headers.get("X-Twilio-Signature")
    if not twilio_signature.is_valid(auth_token or "", _external_url(), request.form, signature):
        log.warning("rejected Twilio callback for provider %s: bad signature", provider_id)
        return problem(403, "Invalid Twilio signature.")
    status = (request.form.get("MessageStatus") or request.form.get("SmsStatus") or "").lower()
    sid = request.form.get("MessageSid") or request.form.get("SmsSid") or ""
    mapped = twilio_event(status, (request.form.get("ErrorCode") or "").strip())
    if mapped is None or not sid:
        return Response("", 200, mimetype="text/plain")
    event_type, data = mapped
    with organization_scope(provider.organization_id):
        _apply(Channel.SMS, sid, event_type, data=data)
        db.session.commit()
    return Response("", 200, mimetype="text/plain")
