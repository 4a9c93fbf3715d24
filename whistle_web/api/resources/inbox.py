"""The in-app inbox over HTTP, for clients without a socket: the feed and the same actions.

Authenticated with the recipient token (not an API key) and callable from the customer's
own pages: CORS answers the organization's allowed origins (Organization.allowed_origins)
and the server's own origin.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from flask import Response, current_app, g, request
from pydantic import Field
from sqlalchemy import any_, literal, or_, select

from whistle_web.api import bp
from whistle_web.api.framework import Out, Schema, endpoint
from whistle_web.api.resources.audiences import Text
from whistle_web.api.resources.sending import MAX_ID
from whistle_web.extensions import db
from whistle_web.inbox import services
from whistle_web.inbox.services import MAX_SEEN_IDS, InboxOwner
from whistle_web.inbox.socket import normalize_origin, origin_allowed
from whistle_web.organizations.models import Organization

TAGS = ["Inbox"]
PREFIX = "/api/v1/inbox"


class InboxQuery(Schema):
    limit: int = Field(default=20, ge=1, le=100)
    cursor: Text | None = Field(default=None, max_length=200)
    status: Literal["unread", "read", "all"] = "all"
    archived: bool = Field(default=False, description="Archived items instead of the inbox.")


class InboxItemOut(Out):
    seq: int | None = Field(description="The item's latest inbox sequence number.")
    id: int = Field(description="The in-app delivery's id.")
    notification_id: int
    title: str
    body: str
    action_url: str | None
    data: dict[str, Any]
    created_at: datetime
    seen_at: datetime | None
    read_at: datetime | None
    archived_at: datetime | None
    clicked_at: datetime | None


class InboxPage(Out):
    items: list[InboxItemOut]
    next_cursor: str | None
    unread_count: int
    seq: int = Field(description="The recipient's latest sequence number (resume after it).")
    preferences_url: str = Field(description="Signed link to the hosted preference page.")


class UnreadCountOut(Out):
    count: int


class SeenIn(Schema):
    ids: list[Annotated[int, Field(ge=1, le=MAX_ID)]] = Field(min_length=1, max_length=MAX_SEEN_IDS)

    def checked(self) -> list[int]:
        return services.check_ids(self.ids)


class ActionOut(Out):
    items: list[InboxItemOut]
    unread_count: int


class ReadAllOut(Out):
    marked: int = Field(description="How many items were marked read.")
    unread_count: int


def _owner() -> InboxOwner:
    return g.inbox_owner


def _acted(items: list[dict[str, Any]]) -> ActionOut:
    return ActionOut(
        items=[InboxItemOut.model_validate(i) for i in items],
        unread_count=services.unread_count(_owner()),
    )


@endpoint(
    bp,
    "GET",
    "/inbox",
    summary="List the recipient's inbox",
    tags=TAGS,
    query=InboxQuery,
    response=InboxPage,
    auth="recipient",
)
def list_inbox(query: InboxQuery) -> InboxPage:
    """Newest first. `status` filters on read state; `archived=true` lists archived items
    instead. Pass `next_cursor` back as `cursor` for the next page; `seq` is what a socket
    resumes after (`last_seq`)."""
    owner = _owner()
    page = services.feed(
        owner,
        limit=query.limit,
        cursor=query.cursor,
        status=query.status,
        archived=query.archived,
    )
    return InboxPage(
        items=[InboxItemOut.model_validate(i) for i in page["items"]],
        next_cursor=page["next_cursor"],
        unread_count=page["unread_count"],
        seq=page["seq"],
        preferences_url=services.preferences_url(owner),
    )


@endpoint(
    bp,
    "GET",
    "/inbox/unread-count",
    summary="Count the recipient's unread items",
    tags=TAGS,
    response=UnreadCountOut,
    auth="recipient",
)
def inbox_unread_count() -> UnreadCountOut:
    """Unread items that are not archived."""
    return UnreadCountOut(count=services.unread_count(_owner()))


@endpoint(
    bp,
    "POST",
    "/inbox/seen",
    summary="Mark inbox items seen",
    tags=TAGS,
    body=SeenIn,
    response=ActionOut,
    auth="recipient",
    errors=[404],
)
def inbox_seen(body: SeenIn) -> ActionOut:
    """Up to 100 ids. An id that is not one of this recipient's items is a 404 and
    nothing is changed."""
    return _acted(services.act(_owner(), "seen", body.checked()))


def _single(action: str, summary: str) -> None:
    def view(id: int) -> ActionOut:
        return _acted(services.act(_owner(), action, [id]))

    view.__name__ = f"inbox_{action}"
    view.__doc__ = (
        "Goes through the delivery ledger and funnel like `POST /api/v1/events`; every open "
        "socket of the recipient hears of it."
    )
    endpoint(
        bp,
        "POST",
        f"/inbox/{{id}}/{action}",
        summary=summary,
        tags=TAGS,
        response=ActionOut,
        auth="recipient",
        errors=[404],
    )(view)


_single("read", "Mark an inbox item read")
_single("archive", "Archive an inbox item")
_single("clicked", "Record a click on an inbox item")


@endpoint(
    bp,
    "POST",
    "/inbox/read-all",
    summary="Mark every inbox item read",
    tags=TAGS,
    response=ReadAllOut,
    auth="recipient",
)
def inbox_read_all() -> ReadAllOut:
    """Each item goes through the ledger as a `read` event."""
    owner = _owner()
    marked = services.read_all(owner)
    return ReadAllOut(marked=marked, unread_count=services.unread_count(owner))


# --- CORS --------------------------------------------------------------------------------

ALLOW_HEADERS = "Authorization, Content-Type"
EXPOSE_HEADERS = "RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset, Retry-After"


def _origin_allowed(origin: str) -> bool:
    """The token's organization decides; before a token is known (preflight, 401), any
    organization listing the origin does, so the widget can read why it was refused."""
    base_url = current_app.config["WHISTLE_BASE_URL"]
    owner = getattr(g, "inbox_owner", None)
    if owner is not None:
        organization = db.session.get(Organization, owner.organization_id)
        allowed = list(organization.allowed_origins or []) if organization else []
        return origin_allowed(origin, allowed, base_url)
    if origin_allowed(origin, [], base_url):
        return True
    normalized = normalize_origin(origin)
    if normalized is None:
        return False
    return bool(
        db.session.scalar(
            select(Organization.id)
            .where(
                or_(
                    literal(origin) == any_(Organization.allowed_origins),
                    literal(normalized) == any_(Organization.allowed_origins),
                )
            )
            .limit(1)
        )
    )


@bp.after_request
def _cors(response: Response) -> Response:
    if not (request.path == PREFIX or request.path.startswith(PREFIX + "/")):
        return response
    response.vary.add("Origin")
    origin = request.headers.get("Origin")
    if not origin or not _origin_allowed(origin):
        return response
    response.headers["Access-Control-Allow-Origin"] = origin
    response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
    if request.method == "OPTIONS":
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
        response.headers["Access-Control-Allow-Headers"] = ALLOW_HEADERS
        response.headers["Access-Control-Max-Age"] = "600"
    return response
