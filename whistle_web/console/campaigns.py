"""Campaigns in the console: list, composer, pre-launch check, live progress, actions.

Every change goes through :mod:`whistle_web.campaigns.services` (the API calls the same
functions); the numbers come from the funnel counters, never from counting deliveries.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from flask import abort, flash, make_response, redirect, render_template, request, url_for
from flask_login import current_user
from flask_wtf import FlaskForm
from wtforms import (
    DateTimeLocalField,
    RadioField,
    SelectField,
    SelectMultipleField,
    StringField,
    TextAreaField,
    TimeField,
)
from wtforms.fields.choices import SelectChoice
from wtforms.validators import DataRequired, Length, Optional
from wtforms.widgets import CheckboxInput, ListWidget

from whistle_web.campaigns import services
from whistle_web.campaigns.models import AudienceType, Campaign, CampaignStatus
from whistle_web.console.access import actor, render, requires
from whistle_web.console.views import bp
from whistle_web.deliveries.models import StatScope
from whistle_web.deliveries.services import funnel, funnel_totals
from whistle_web.errors import DomainError, InvalidState, NotFound, ValidationError
from whistle_web.extensions import db, htmx
from whistle_web.message_templates.models import Template

PAGE_SIZE = 50
# The page polls while these states can still change by themselves.
LIVE_STATES = (CampaignStatus.SENDING,)
# A one-off campaign scheduled this soon is polled too, so its page shows the start.
SOON = timedelta(minutes=5)
MAX_EXTERNAL_IDS = 10_000
MAX_ID = 2**63 - 1  # bigint: a larger id is simply not found
CHANNEL_LABELS = {
    "email": "Email",
    "sms": "SMS",
    "push": "Push",
    "in_app": "In-app",
    "webhook": "Webhook",
}
REASON_LABELS = {
    "unsubscribed": "Unsubscribed from everything",
    "suppression_list": "On the suppression list",
    "preference": "Turned this off in preferences",
    "no_address": "No address or device",
    "frequency_cap": "Frequency cap reached",
}
# A service's field name -> the composer's.
FIELD_OF = {
    "to": "external_ids",
    "cron_timezone": "timezone",
    "local_send_time": "local_time",
    "data": "payload",
    "template_key": "template",
    "audience_type": "audience",
}


@lru_cache(maxsize=1)
def timezones() -> list[str]:
    return ["UTC", *sorted(z for z in available_timezones() if z != "UTC")]


class CampaignForm(FlaskForm):
    name = StringField(
        "Name", validators=[DataRequired("Give the campaign a name."), Length(max=200)]
    )
    template = SelectField("Template", validate_choice=False)
    channels = SelectMultipleField(
        "Channels",
        widget=ListWidget(prefix_label=False),
        option_widget=CheckboxInput(),
        validate_choice=False,
    )
    audience = RadioField(
        "Audience",
        choices=[
            SelectChoice("all", "Everyone"),
            SelectChoice("segment", "A segment"),
            SelectChoice("topic", "Subscribers of a topic"),
            SelectChoice("list", "Pasted external ids"),
        ],
        default="all",
    )
    segment = SelectField("Segment", validate_choice=False)
    topic = SelectField("Topic", validate_choice=False)
    external_ids = TextAreaField("External ids (one per line or comma-separated)")
    when = RadioField(
        "When",
        choices=[
            SelectChoice("now", "Now, at launch"),
            SelectChoice("at", "At a time"),
            SelectChoice("local", "At a local time in each recipient's time zone"),
            SelectChoice("cron", "Recurring (cron)"),
        ],
        default="now",
    )
    send_at = DateTimeLocalField("Send at", format="%Y-%m-%dT%H:%M", validators=[Optional()])
    timezone = SelectField("Time zone", default="UTC", validate_choice=False)
    local_time = TimeField("Local time", validators=[Optional()])
    cron = StringField("Cron expression", validators=[Optional(), Length(max=120)])
    # Not ``data``: that name is the form's own dict of values.
    payload = TextAreaField("Data (a JSON object, available as {{ data.* }})", default="{}")

    def set_choices(self, choices: dict[str, Any]) -> None:
        self.template.choices = [SelectChoice("", "Choose a published template")] + [
            SelectChoice(t["key"], f"{t['name']} ({t['key']})") for t in choices["templates"]
        ]
        chosen = next((t for t in choices["templates"] if t["key"] == self.template.data), None)
        self.channels.choices = [
            SelectChoice(c, CHANNEL_LABELS.get(c, c))
            for c in (chosen["channels"] if chosen else [])
        ]
        self.segment.choices = [SelectChoice("", "Choose a segment")] + [
            SelectChoice(str(id_), name) for id_, name in choices["segments"]
        ]
        self.topic.choices = [SelectChoice("", "Choose a topic")] + [
            SelectChoice(key, f"{name} ({key})") for key, name in choices["topics"]
        ]
        self.timezone.choices = [SelectChoice(z) for z in timezones()]

    def add_error(self, name: str, message: str) -> None:
        field = getattr(self, FIELD_OF.get(name, name), None)
        if field is None or not hasattr(field, "errors"):
            self.form_errors.append(message)
            return
        if isinstance(field.errors, tuple):
            field.errors = list(field.errors)
        field.errors.append(message)


def _external_ids(text: str) -> list[str]:
    parts = text.replace(",", "\n").splitlines()
    return list(dict.fromkeys(p.strip() for p in parts if p.strip()))


def _values(form: CampaignForm) -> dict[str, Any] | None:
    """The form as update_campaign's ``changes``; None when a field is wrong (errors set)."""
    ok = True
    # PostgreSQL text and jsonb cannot hold NUL characters.
    for field in (form.name, form.external_ids, form.cron, form.payload, form.topic):
        if "\x00" in (field.data or ""):
            form.add_error(field.name, "Remove the NUL character.")
            ok = False
    if not ok:
        return None
    values: dict[str, Any] = {
        "name": (form.name.data or "").strip(),
        "template_key": form.template.data or "",
        "channels": list(form.channels.data or []),
        "audience_type": form.audience.data or "all",
        "segment_id": None,
        "topic_key": None,
        "external_ids": None,
        "send_at": None,
        "local_send_time": None,
        "cron": None,
        "cron_timezone": form.timezone.data or "UTC",
    }
    if not values["template_key"]:
        form.add_error("template", "Choose a published template.")
        ok = False
    allowed = {choice.value for choice in form.channels.choices or []}
    if any(c not in allowed for c in values["channels"]):
        form.add_error("channels", "Choose among the template's channels.")
        ok = False
    audience = values["audience_type"]
    if audience == "segment":
        raw = form.segment.data or ""
        if not (raw.isascii() and raw.isdigit()) or int(raw) > MAX_ID:
            form.add_error("segment", "Choose an existing segment.")
            ok = False
        else:
            values["segment_id"] = int(form.segment.data)
    elif audience == "topic":
        values["topic_key"] = form.topic.data or ""
    elif audience == "list":
        ids = _external_ids(form.external_ids.data or "")
        if len(ids) > MAX_EXTERNAL_IDS:
            form.add_error("external_ids", f"At most {MAX_EXTERNAL_IDS:,} external ids.")
            ok = False
        if any(len(i) > 255 for i in ids):
            form.add_error("external_ids", "An external id has at most 255 characters.")
            ok = False
        values["external_ids"] = ids
    try:
        zone = ZoneInfo(values["cron_timezone"])
    except (ZoneInfoNotFoundError, ValueError):
        form.add_error("timezone", "Not an IANA time zone.")
        zone, ok = ZoneInfo("UTC"), False
    when = form.when.data or "now"
    if when == "at":
        if form.send_at.data is None:
            form.add_error("send_at", "Give a date and time.")
            ok = False
        else:
            send_at = form.send_at.data.replace(tzinfo=zone)
            if send_at <= datetime.now(UTC):
                form.add_error("send_at", "Choose a time in the future (or send now).")
                ok = False
            values["send_at"] = send_at
    elif when == "local":
        if form.local_time.data is None:
            form.add_error("local_time", "Give the local time, e.g. 09:00.")
            ok = False
        values["local_send_time"] = form.local_time.data
    elif when == "cron":
        if not (form.cron.data or "").strip():
            form.add_error("cron", "Give a cron expression, e.g. '0 9 * * MON'.")
            ok = False
        values["cron"] = (form.cron.data or "").strip()
    try:
        data = json.loads(form.payload.data or "{}")
    except ValueError as error:
        form.add_error("data", f"Not valid JSON: {error}")
        ok = False
    else:
        if "\\u0000" in form.payload.data:
            form.add_error("data", "Remove the NUL character (\\u0000).")
            ok = False
        elif not isinstance(data, dict):
            form.add_error("data", 'Give a JSON object, e.g. {"offer": "20%"}.')
            ok = False
        values["data"] = data
    return values if ok else None


def _fill(form: CampaignForm, campaign: Campaign) -> None:
    """Put a saved campaign into the composer."""
    form.name.data = campaign.name
    form.template.data = db.session.scalar(
        db.select(Template.key).where(Template.id == campaign.template_id)
    )
    form.channels.data = list(campaign.channels)
    form.audience.data = campaign.audience_type.value
    form.segment.data = str(campaign.segment_id or "")
    if campaign.topic_id:
        from whistle_web.audiences.models import Topic

        form.topic.data = db.session.scalar(
            db.select(Topic.key).where(Topic.id == campaign.topic_id)
        )
    form.external_ids.data = "\n".join(campaign.audience_external_ids or [])
    form.timezone.data = campaign.cron_timezone or "UTC"
    if campaign.cron:
        form.when.data, form.cron.data = "cron", campaign.cron
    elif campaign.local_send_time is not None:
        form.when.data, form.local_time.data = "local", campaign.local_send_time
    elif campaign.send_at is not None:
        form.when.data = "at"
        form.send_at.data = campaign.send_at.astimezone(ZoneInfo(form.timezone.data)).replace(
            tzinfo=None
        )
    else:
        form.when.data = "now"
    form.payload.data = json.dumps(campaign.data or {}, indent=2)


def _get(campaign_id: int) -> Campaign:
    if campaign_id > MAX_ID:
        abort(404)
    try:
        return services.get_campaign(campaign_id)
    except NotFound:
        abort(404)


def _rates(metrics: dict[str, int]) -> dict[str, float | None]:
    sent, queued = metrics.get("sent", 0), metrics.get("queued", 0)
    return {
        "progress": metrics.get("sent", 0) / queued if queued else None,
        "delivered": metrics.get("delivered", 0) / sent if sent else None,
        "seen": metrics.get("seen", 0) / sent if sent else None,
        "clicked": metrics.get("clicked", 0) / sent if sent else None,
    }


# --- list ---------------------------------------------------------------------------------
@bp.get("/campaigns")
@requires("view")
def campaigns() -> Any:
    """Campaigns, newest first, with state, progress and key rates."""
    state = request.args.get("state", "")
    if state and state not in CampaignStatus.__members__.values():
        state = ""
    stmt = db.select(Campaign).order_by(Campaign.id.desc()).limit(PAGE_SIZE)
    if state:
        stmt = stmt.where(Campaign.status == CampaignStatus(state))
    rows = db.session.scalars(stmt).all()
    totals = funnel_totals(StatScope.CAMPAIGN, [c.id for c in rows])
    items = [{"campaign": c, "metrics": totals[c.id], "rates": _rates(totals[c.id])} for c in rows]
    context = {"items": items, "state": state, "states": list(CampaignStatus)}
    # Only the filter's own request gets the table alone (a history restore wants the page).
    if htmx and htmx.target == "campaign-table":
        return render_template("console/campaigns/_table.html", **context)
    return render_template("console/campaigns/index.html", **context)


# --- composer -----------------------------------------------------------------------------
def _composer(form: CampaignForm, campaign: Campaign | None, status: int = 200) -> Any:
    return render_template(
        "console/campaigns/form.html", form=form, campaign=campaign, choices=form._choices
    ), status


def _form(campaign: Campaign | None = None) -> CampaignForm:
    form = CampaignForm()
    if campaign is not None and request.method == "GET":
        _fill(form, campaign)
    choices = services.composer_choices()
    form.set_choices(choices)
    form._choices = choices  # type: ignore[attr-defined]
    return form


@bp.route("/campaigns/new", methods=["GET", "POST"])
@requires("edit")
def campaign_new() -> Any:
    """Compose a draft campaign."""
    form = _form()
    if request.method == "GET":
        if request.args.get("template"):
            form.template.data = request.args["template"]
            form.set_choices(form._choices)  # type: ignore[attr-defined]
        return _composer(form, None)
    valid = form.validate_on_submit()
    values = _values(form)
    if valid and values is not None:
        try:
            campaign = services.create_campaign(
                values["name"],
                template_key=values["template_key"],
                channels=values["channels"],
                audience_type=values["audience_type"],
                segment_id=values["segment_id"],
                topic_key=values["topic_key"],
                external_ids=values["external_ids"],
                data=values["data"],
                send_at=values["send_at"],
                local_send_time=values["local_send_time"],
                cron=values["cron"],
                cron_timezone=values["cron_timezone"],
                actor=actor(),
                created_by_id=current_user.id,
            )
        except ValidationError as error:
            for field_error in error.errors:
                form.add_error(field_error.field, field_error.message)
        else:
            flash("Draft saved. Check it, then launch.", "info")
            return redirect(url_for("console.campaign_show", campaign_id=campaign.id), 303)
    return _composer(form, None, 422)


@bp.route("/campaigns/<int:campaign_id>/edit", methods=["GET", "POST"])
@requires("edit")
def campaign_edit(campaign_id: int) -> Any:
    """Edit a draft or scheduled campaign (a scheduled one is rescheduled)."""
    campaign = _get(campaign_id)
    if campaign.status not in services.EDITABLE:
        flash(f"A {campaign.status} campaign cannot be edited. Duplicate it instead.", "error")
        return redirect(url_for("console.campaign_show", campaign_id=campaign.id), 303)
    form = _form(campaign)
    if request.method == "GET":
        return _composer(form, campaign)
    valid = form.validate_on_submit()
    values = _values(form)
    if valid and values is not None:
        try:
            services.update_campaign(campaign.id, values, actor=actor())
        except ValidationError as error:
            db.session.rollback()
            for field_error in error.errors:
                name = field_error.field
                if name == "send_at" and form.when.data != "at":
                    name = "when"  # the time field is hidden: say it where it shows
                form.add_error(name, field_error.message)
        except InvalidState as error:
            flash(error.detail, "error")
            return redirect(url_for("console.campaign_show", campaign_id=campaign.id), 303)
        else:
            flash("Campaign saved.", "info")
            return redirect(url_for("console.campaign_show", campaign_id=campaign.id), 303)
    return _composer(form, _get(campaign_id), 422)


@bp.get("/campaigns/channels")
@requires("edit")
def campaign_channels() -> Any:
    """The channel checkboxes for the chosen template (the composer swaps them in)."""
    form = _form()
    form.template.data = request.args.get("template", "")
    form.set_choices(form._choices)  # type: ignore[attr-defined]
    form.channels.data = [choice.value for choice in form.channels.choices]
    return render_template("console/campaigns/_channels.html", form=form)


@bp.get("/campaigns/cron-preview")
@requires("view")
def campaign_cron_preview() -> Any:
    """The next runs of a cron expression, in words (the composer shows them as you type)."""
    cron = request.args.get("cron", "").strip()[:120]
    zone = request.args.get("timezone", "UTC")[:64]
    runs: list[datetime] = []
    error = None
    if cron:
        try:
            runs = services.next_cron_runs(cron, zone)
        except ValidationError as exc:
            error = exc.errors[0].message
    return render_template(
        "console/campaigns/_cron_preview.html", cron=cron, runs=runs, error=error, zone=zone
    )


# --- one campaign ------------------------------------------------------------------------
def _live(campaign: Campaign) -> bool:
    """Whether the page should poll: sending, or a one-off send about to start."""
    if campaign.status in LIVE_STATES:
        return True
    return (
        campaign.status == CampaignStatus.SCHEDULED
        and not campaign.cron
        and campaign.next_run_at is not None
        and campaign.next_run_at <= datetime.now(UTC) + SOON
    )


def _live_context(campaign: Campaign) -> dict[str, Any]:
    metrics = funnel(StatScope.CAMPAIGN, campaign.id)
    overall = metrics.pop("all")
    return {
        "campaign": campaign,
        "overall": overall,
        "rates": _rates(overall),
        "by_channel": {
            channel: {"metrics": values, "rates": _rates(values)}
            for channel, values in sorted(metrics.items())
        },
        "live": _live(campaign),
        "runs": services.campaign_runs(campaign.id),
    }


@bp.get("/campaigns/<int:campaign_id>")
@requires("view")
def campaign_show(campaign_id: int) -> Any:
    """Settings, live progress (an htmx request gets only the progress) and runs."""
    campaign = _get(campaign_id)
    context = _live_context(campaign)
    return render(
        "console/campaigns/show.html",
        "console/campaigns/_live.html",
        message_template=db.session.get(Template, campaign.template_id),
        audience=_audience_summary(campaign),
        **context,
    )


def _audience_summary(campaign: Campaign) -> str:
    from whistle_web.audiences.models import Segment, Topic

    if campaign.audience_type == AudienceType.SEGMENT:
        segment = db.session.get(Segment, campaign.segment_id)
        return f"Segment “{segment.name if segment else campaign.segment_id}”"
    if campaign.audience_type == AudienceType.TOPIC:
        topic = db.session.get(Topic, campaign.topic_id)
        return f"Subscribers of “{topic.name if topic else campaign.topic_id}”"
    if campaign.audience_type == AudienceType.LIST:
        ids = campaign.audience_external_ids or []
        shown = ", ".join(ids[:5]) + (f" and {len(ids) - 5:,} more" if len(ids) > 5 else "")
        return f"{len(ids):,} pasted external ids: {shown}"
    return "Everyone"


@bp.get("/campaigns/<int:campaign_id>/check")
@requires("view")
def campaign_check(campaign_id: int) -> Any:
    """The pre-launch check: samples rendered, the audience after the rules, the duration."""
    campaign = _get(campaign_id)
    return _check_page(campaign)


def _check_page(campaign: Campaign, error: str | None = None, status: int = 200) -> Any:
    context: dict[str, Any] = {
        "campaign": campaign,
        "error": error,
        "reason_labels": REASON_LABELS,
    }
    try:
        context["samples"] = services.render_samples(campaign.id)
        count = services.count_campaign_audience(campaign.id)
    except ValidationError as exc:
        context.update(samples=[], count=None, estimate=None, problem=exc.errors[0].message)
        return render_template("console/campaigns/check.html", **context), status
    context["count"] = count
    context["estimate"] = services.estimate_send_seconds(
        {channel: entry.get("queued", 0) for channel, entry in count.channels.items()}
    )
    context["problem"] = None
    return render_template("console/campaigns/check.html", **context), status


# The sample email's own page: a sandbox where nothing runs, styles inline as in a mail client.
FRAME_CSP = (
    "sandbox; default-src 'none'; img-src https: http: data:; style-src 'unsafe-inline'; "
    "font-src https: data:; frame-ancestors 'self'; form-action 'none'; base-uri 'none'"
)


@bp.get("/campaigns/<int:campaign_id>/check/email/<int:index>")
@requires("view")
def campaign_check_email(campaign_id: int, index: int) -> Any:
    """The email HTML of one sample recipient, for the check page's sandboxed iframe."""
    campaign = _get(campaign_id)
    if index >= services.PREVIEW_SAMPLE:
        abort(404)
    try:
        samples = services.render_samples(campaign.id, sample=index + 1)
    except ValidationError:
        abort(404)
    if len(samples) <= index:
        abort(404)
    html = samples[index]["channels"].get("email", {}).get("html")
    if not html:
        abort(404)
    response = make_response(html)
    response.mimetype = "text/html"
    response.headers["Content-Security-Policy"] = FRAME_CSP
    response.headers["X-Frame-Options"] = "SAMEORIGIN"
    response.headers["Cache-Control"] = "no-store"
    return response


# --- actions ------------------------------------------------------------------------------
def _after_action(campaign: Campaign, notice: str, category: str) -> Any:
    """The live fragment (with the notice) for htmx, else back to the campaign's page."""
    if htmx:
        return render_template(
            "console/campaigns/_live.html",
            notice=notice,
            notice_category=category,
            **_live_context(campaign),
        )
    flash(notice, category)
    return redirect(url_for("console.campaign_show", campaign_id=campaign.id), 303)


@bp.post("/campaigns/<int:campaign_id>/launch")
@requires("send")
def campaign_launch(campaign_id: int) -> Any:
    """Launch now, or schedule (at its time, or its cron)."""
    campaign = _get(campaign_id)
    try:
        campaign = services.launch_campaign(campaign.id, actor=actor())
    except ValidationError as error:
        db.session.rollback()
        return _check_page(_get(campaign_id), error=error.errors[0].message, status=422)
    except InvalidState as error:
        db.session.rollback()
        flash(error.detail, "error")
    else:
        if campaign.status == CampaignStatus.SCHEDULED:
            flash("Campaign scheduled.", "info")
        else:
            flash("Campaign launched.", "info")
    return redirect(url_for("console.campaign_show", campaign_id=campaign_id), 303)


def _transition(campaign_id: int, service: Any, done: str) -> Any:
    campaign = _get(campaign_id)
    try:
        campaign = service(campaign.id, actor=actor())
    except InvalidState as error:
        db.session.rollback()
        return _after_action(_get(campaign_id), error.detail, "error")
    return _after_action(campaign, done, "info")


@bp.post("/campaigns/<int:campaign_id>/pause")
@requires("send")
def campaign_pause(campaign_id: int) -> Any:
    return _transition(campaign_id, services.pause_campaign, "Campaign paused.")


@bp.post("/campaigns/<int:campaign_id>/resume")
@requires("send")
def campaign_resume(campaign_id: int) -> Any:
    return _transition(campaign_id, services.resume_campaign, "Campaign resumed.")


@bp.route("/campaigns/<int:campaign_id>/cancel", methods=["GET", "POST"])
@requires("send")
def campaign_cancel(campaign_id: int) -> Any:
    """Ask first (GET), then cancel everything not yet sent (POST)."""
    campaign = _get(campaign_id)
    if request.method == "GET":
        return render_template("console/campaigns/cancel.html", campaign=campaign)
    return _transition(campaign_id, services.cancel_campaign, "Campaign cancelled.")


@bp.post("/campaigns/<int:campaign_id>/duplicate")
@requires("edit")
def campaign_duplicate(campaign_id: int) -> Any:
    """Copy the campaign's settings into a new draft and open it in the composer."""
    campaign = _get(campaign_id)
    try:
        copy = services.duplicate_campaign(
            campaign.id, actor=actor(), created_by_id=current_user.id
        )
    except DomainError as error:
        db.session.rollback()
        flash(f"Could not duplicate: {error.detail}", "error")
        return redirect(url_for("console.campaign_show", campaign_id=campaign_id), 303)
    flash("Copied into a new draft.", "info")
    return redirect(url_for("console.campaign_edit", campaign_id=copy.id), 303)


@bp.post("/campaigns/<int:campaign_id>/delete")
@requires("edit")
def campaign_delete(campaign_id: int) -> Any:
    """Delete a draft or scheduled campaign that never ran."""
    campaign = _get(campaign_id)
    try:
        services.delete_campaign(campaign.id, actor=actor())
    except InvalidState as error:
        db.session.rollback()
        flash(error.detail, "error")
        return redirect(url_for("console.campaign_show", campaign_id=campaign_id), 303)
    flash("Campaign deleted.", "info")
    return redirect(url_for("console.campaigns"), 303)
