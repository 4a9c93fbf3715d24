"""The recipient's story: a recipient's History tab, "why not" for a campaign, and a search.

Who sees what: every member (viewer and up) sees the path of each delivery (template,
campaign, suppression and its reason, provider, provider message id, statuses and times,
attempts, errors). The message as sent (subject, text, HTML) is message content, which may
hold personal data: only members who may edit (editor and up) see it. The server enforces
this: the content is left out of the page for viewers and its frame answers 403.

The email HTML is served by its own URL into a sandboxed iframe, under a strict CSP of its
own (``templates_pages.FRAME_CSP``, the template editor's preview frame): no script runs.
"""

from __future__ import annotations

from typing import Any

from flask import abort, make_response, redirect, request, url_for

from whistle_web.console.access import can, render, requires
from whistle_web.console.templates_pages import FRAME_CSP
from whistle_web.console.views import bp
from whistle_web.deliveries import explain as explainer
from whistle_web.deliveries import story
from whistle_web.errors import NotFound
from whistle_web.recipients import services as recipients

MAX_ID = 2**63 - 1


def _recipient(recipient_id: int) -> Any:
    try:
        return recipients.get_recipient_by_id(recipient_id)
    except NotFound:
        abort(404)


def _int_arg(name: str) -> int | None:
    value = request.args.get(name, "")
    if value.isdigit() and len(value) < 20 and 0 < int(value) <= MAX_ID:
        return int(value)
    return None


@bp.get("/recipients/<int:recipient_id>/history")
@requires("view")
def recipient_history(recipient_id: int) -> Any:
    """The recipient's notifications, newest first; htmx "Load more" appends entries."""
    recipient = _recipient(recipient_id)
    before = _int_arg("before")
    entries, next_cursor = story.recipient_story(recipient.id, before=before, limit=story.PAGE_SIZE)
    campaign_id = _int_arg("campaign")
    return render(
        "console/story/history.html",
        "console/story/_entries.html",
        recipient=recipient,
        entries=entries,
        next_cursor=next_cursor,
        show_content=can("edit"),
        campaigns=explainer.campaign_choices(),
        chosen_campaign=campaign_id,
    )


@bp.get("/recipients/<int:recipient_id>/deliveries/<int:delivery_id>/message")
@requires("edit")
def recipient_delivery_frame(recipient_id: int, delivery_id: int) -> Any:
    """The email HTML as sent, for the sandboxed iframe (editor and up)."""
    recipient = _recipient(recipient_id)
    delivery = story.get_delivery(recipient.id, delivery_id)
    html = (delivery.rendered or {}).get("html") if delivery is not None else None
    if not isinstance(html, str):
        abort(404)
    response = make_response(html)
    response.mimetype = "text/html"
    response.headers["Content-Security-Policy"] = FRAME_CSP
    response.headers["X-Frame-Options"] = "SAMEORIGIN"
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/recipients/<int:recipient_id>/why-not")
@requires("view")
def recipient_why_not(recipient_id: int) -> Any:
    """Why this recipient did (not) get a chosen campaign, one sentence per channel."""
    recipient = _recipient(recipient_id)
    campaign_id = _int_arg("campaign")
    result = None
    if campaign_id is not None:
        try:
            result = explainer.explain(recipient.id, campaign_id)
        except NotFound:
            abort(404)
    elif request.args.get("campaign"):
        abort(404)
    return render(
        "console/story/why_not.html",
        "console/story/_why_not.html",
        recipient=recipient,
        campaigns=explainer.campaign_choices(),
        chosen_campaign=campaign_id,
        result=result,
    )


@bp.get("/recipients/story")
@requires("view")
def recipient_story_search() -> Any:
    """Find a recipient by email, phone or external id; one match opens their history."""
    query = request.args.get("q", "")[:500].strip()
    rows: list[Any] = []
    if query:
        rows, _ = recipients.search_recipients(query, limit=20)
        exact = [
            r
            for r in rows
            if query in (r.external_id, r.phone) or (r.email or "").lower() == query.lower()
        ]
        if len(exact) == 1 or len(rows) == 1:
            target = exact[0] if len(exact) == 1 else rows[0]
            url = url_for("console.recipient_history", recipient_id=target.id)
            if request.headers.get("HX-Request"):
                response = make_response("", 200)
                response.headers["HX-Redirect"] = url
                return response
            return redirect(url, 303)
    return render(
        "console/story/search.html",
        "console/story/_search_results.html",
        query=query,
        rows=rows,
    )
