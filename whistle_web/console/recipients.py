"""Recipients: search, profile (attributes, devices, topics, preferences), CSV import/export."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import time
from typing import Any
from zoneinfo import available_timezones

from flask import Response, abort, flash, g, redirect, request, stream_with_context, url_for
from sqlalchemy import select

from whistle_web.audiences import services as audiences
from whistle_web.audiences.models import Segment
from whistle_web.audiences.segments import compile_rules
from whistle_web.channels.kinds import Channel
from whistle_web.console.access import actor, render, requires
from whistle_web.console.views import bp
from whistle_web.errors import FieldError, NotFound, ValidationError
from whistle_web.extensions import db
from whistle_web.organizations.services import record_audit
from whistle_web.preferences import services as preferences
from whistle_web.recipients import services as recipients
from whistle_web.recipients.csv_io import export_csv
from whistle_web.tenancy import organization_scope
from workers import imports

MAX_IMPORT_BYTES = 10 * 1024 * 1024
IMPORT_ID = re.compile(r"^[0-9a-f]{32}$")
CHANNELS = [str(c) for c in Channel]
ALL = "*"  # the preference row that applies to every category


def _recipient(recipient_id: int) -> Any:
    try:
        return recipients.get_recipient_by_id(recipient_id)
    except NotFound:
        abort(404)


def _cursor() -> int | None:
    after = request.args.get("after", "")
    return int(after) if after.isdigit() and len(after) < 20 else None


# --- list -------------------------------------------------------------------------------


@bp.get("/recipients", endpoint="recipients")
@requires("view")
def recipients_index():  # type: ignore[no-untyped-def]
    query = request.args.get("q", "")[:500]
    rows, next_cursor = recipients.search_recipients(query, after=_cursor())
    partial = "console/recipients/_results.html"
    if request.headers.get("HX-Target") == "recipient-more":
        partial = "console/recipients/_rows.html"  # "Load more" appends rows only
    return render(
        "console/recipients/index.html",
        partial,
        query=query,
        rows=rows,
        next_cursor=next_cursor,
        paged=_cursor() is not None,
        segments=_segments(),
    )


def _segments() -> list[Any]:
    """The segments to offer for an export."""
    return list(db.session.scalars(select(Segment).order_by(Segment.name).limit(500)))


# --- profile ----------------------------------------------------------------------------


def _matrix(external_id: str) -> dict[str, Any]:
    prefs = preferences.get_preferences(external_id)
    rows = [
        {"key": ALL, "name": "All categories", "critical": False, "channels": prefs["channels"]}
    ]
    rows += prefs["categories"]
    return {"prefs": prefs, "rows": rows}


def _profile_context(recipient: Any, **extra: Any) -> dict[str, Any]:
    context = {
        "recipient": recipient,
        "devices": preferences.list_devices(recipient.external_id),
        "topics": audiences.recipient_topics(recipient.id),
        "channels": CHANNELS,
        "timezones": sorted(available_timezones()),
        "errors": [],
        "saved": False,
        **_matrix(recipient.external_id),
    }
    context.update(extra)
    return context


@bp.get("/recipients/<int:recipient_id>")
@requires("view")
def recipient_show(recipient_id: int):  # type: ignore[no-untyped-def]
    recipient = _recipient(recipient_id)
    return render("console/recipients/show.html", **_profile_context(recipient))


def _parse_time(value: str, name: str, errors: list[FieldError]) -> time | None:
    value = value.strip()
    if not value:
        return None
    try:
        return time.fromisoformat(value)
    except ValueError:
        errors.append(FieldError(name, "Use a time like 22:00."))
        return None


def _preference_changes(form: Any) -> tuple[dict[str, bool], list[dict[str, Any]]]:
    """Only the cells the person changed: each checkbox carries what it showed."""
    channels: dict[str, bool] = {}
    categories: dict[str, dict[str, bool]] = {}
    for name, was in form.items():
        if not name.startswith("was:"):
            continue
        _, channel, key = name.split(":", 2)
        now = form.get(f"on:{channel}:{key}") == "on"
        if now == (was == "1"):
            continue
        if key == ALL:
            channels[channel] = now
        else:
            categories.setdefault(key, {})[channel] = now
    return channels, [{"key": k, "channels": v} for k, v in categories.items()]


@bp.post("/recipients/<int:recipient_id>/preferences")
@requires("edit")
def recipient_preferences(recipient_id: int):  # type: ignore[no-untyped-def]
    recipient = _recipient(recipient_id)
    form = request.form
    errors: list[FieldError] = []
    start = _parse_time(form.get("quiet_start", ""), "quiet_hours.start", errors)
    end = _parse_time(form.get("quiet_end", ""), "quiet_hours.end", errors)
    if (start is None) != (end is None) and not errors:
        errors.append(FieldError("quiet_hours", "Give both a start and an end, or neither."))
    timezone = form.get("timezone", "").strip()
    if timezone:
        errors += [
            e
            for e in recipients.validate_profile(
                {"external_id": recipient.external_id, "timezone": timezone}
            )
        ]
    channels, categories = _preference_changes(form)
    if not errors:
        try:
            quiet: tuple[time, time] | None = (start, end) if start and end else None
            preferences.update_preferences(
                recipient.external_id,
                unsubscribed=form.get("unsubscribed") == "on",
                quiet_hours=quiet,
                channels=channels,
                categories=categories,
                actor=actor(),
            )
            recipients.update_profile(recipient.id, {"timezone": timezone}, actor=actor())
        except ValidationError as exc:
            db.session.rollback()
            errors = exc.errors
    recipient = _recipient(recipient_id)
    context = _profile_context(recipient, errors=errors, saved=not errors)
    status = 422 if errors else 200
    if not errors and not request.headers.get("HX-Request"):
        flash("Preferences saved.", "info")
        return redirect(url_for("console.recipient_show", recipient_id=recipient.id), code=303)
    return render(
        "console/recipients/show.html", "console/recipients/_preferences.html", status, **context
    )


def _topic_change(recipient_id: int, key: str, subscribe: bool):  # type: ignore[no-untyped-def]
    recipient = _recipient(recipient_id)
    try:
        audiences.set_subscription(key, recipient.id, subscribe, actor=actor())
    except NotFound:
        abort(404)
    if not request.headers.get("HX-Request"):
        return redirect(url_for("console.recipient_show", recipient_id=recipient.id), code=303)
    return render(
        "console/recipients/show.html",
        "console/recipients/_topics.html",
        **_profile_context(recipient),
    )


@bp.post("/recipients/<int:recipient_id>/topics/<key>/subscribe")
@requires("edit")
def recipient_subscribe(recipient_id: int, key: str):  # type: ignore[no-untyped-def]
    return _topic_change(recipient_id, key, True)


@bp.post("/recipients/<int:recipient_id>/topics/<key>/unsubscribe")
@requires("edit")
def recipient_unsubscribe(recipient_id: int, key: str):  # type: ignore[no-untyped-def]
    return _topic_change(recipient_id, key, False)


# --- import -----------------------------------------------------------------------------


def _size(n: int) -> str:
    return f"{n // (1024 * 1024)} MB" if n >= 1024 * 1024 else f"{n // 1024} KB"


@bp.route("/recipients/import", methods=["GET", "POST"])
@requires("edit")
def recipient_import():  # type: ignore[no-untyped-def]
    if request.method == "GET":
        return render(
            "console/recipients/import.html", error=None, max_size=_size(MAX_IMPORT_BYTES)
        )
    # Uploads may exceed the app-wide body limit up to the import's own (plus the form).
    request.max_content_length = MAX_IMPORT_BYTES + 64 * 1024
    upload = request.files.get("file")
    error = None
    data = b""
    if upload is None or not upload.filename:
        error = "Choose a CSV file."
    else:
        data = upload.stream.read(MAX_IMPORT_BYTES + 1)
        if len(data) > MAX_IMPORT_BYTES:
            error = f"The file is larger than {_size(MAX_IMPORT_BYTES)}."
        elif not data.strip():
            error = "The file is empty."
    if error:
        return render(
            "console/recipients/import.html",
            error=error,
            max_size=_size(MAX_IMPORT_BYTES),
            status=422,
        )
    import_id = imports.enqueue_import(data, organization_id=g.organization.id, actor=actor())
    return redirect(url_for("console.recipient_import_status", import_id=import_id), code=303)


@bp.get("/recipients/import/<import_id>")
@requires("edit")
def recipient_import_status(import_id: str):  # type: ignore[no-untyped-def]
    status = (
        imports.import_status(import_id, g.organization.id) if IMPORT_ID.match(import_id) else None
    )
    if status is None:
        abort(404)
    finished = status.get("state") in ("done", "invalid", "failed")
    body, code = render(
        "console/recipients/import_status.html",
        "console/recipients/_import_progress.html",
        import_id=import_id,
        progress=status,
        finished=finished,
    )
    # 286 tells htmx to stop polling; a normal page load always gets 200.
    if finished and request.headers.get("HX-Request"):
        code = 286
    return body, code


# --- export -----------------------------------------------------------------------------


@bp.get("/recipients/export")
@requires("edit")
def recipient_export():  # type: ignore[no-untyped-def]
    segment_arg = request.args.get("segment", "")
    conditions: list[Any] = []
    label = "all"
    if segment_arg:
        if not segment_arg.isdigit() or len(segment_arg) > 19:
            abort(404)
        try:
            segment = audiences.get_segment(int(segment_arg))
        except NotFound:
            abort(404)
        conditions.append(compile_rules(segment.rules))
        label = f"segment-{segment.id}"
    record_audit(actor(), "recipients.exported", "segment", int(segment_arg or 0) or None, {})
    db.session.commit()
    filename = f"recipients-{label}.csv"
    organization_id = g.organization.id

    def generate() -> Iterator[str]:
        # The response streams after the view returned: keep the organization scope.
        with organization_scope(organization_id):
            yield from export_csv(*conditions)

    return Response(
        stream_with_context(generate()),
        mimetype="text/csv",
        headers={
            "Content-Disposition": f'attachment; filename="{filename}"',
            "Cache-Control": "no-store",
        },
    )
