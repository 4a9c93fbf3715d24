"""The inbox over HTTP: feed, pagination, filters, actions, CORS and tenant isolation."""

from __future__ import annotations

from typing import Any

import pytest

from tests.api.conftest import assert_problem
from tests.inbox.conftest import deliveries_of, send_in_app, token_for
from tests.pipeline.conftest import CONTENT, assert_counters_match_ledger
from whistle_web.deliveries.models import StatScope
from whistle_web.extensions import db


class Widget:
    """The feed as the widget calls it: recipient token, optional Origin."""

    def __init__(self, client: Any, token: str, origin: str | None = None) -> None:
        self.client = client
        self.token = token
        self.origin = origin

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"}
        if self.origin:
            headers["Origin"] = self.origin
        headers.update(kwargs.pop("headers", {}))
        return self.client.open(f"/api/v1{path}", method=method, headers=headers, **kwargs)


@pytest.fixture
def items(inbox, jobs):  # type: ignore[no-untyped-def]
    org, ada = inbox["org"], inbox["ada"]
    for reason in ("one", "two", "three"):
        send_in_app(org.id, "u-1", jobs, reason=reason)
    return deliveries_of(org.id, ada.id)


@pytest.fixture
def widget(client, inbox):  # type: ignore[no-untyped-def]
    return Widget(client, token_for(inbox["org"].id, "u-1"))


def test_feed_pages_newest_first(widget, items):
    first = widget.call("GET", "/inbox?limit=2")
    assert first.status_code == 200, first.get_data(as_text=True)
    body = first.json
    assert [i["body"] for i in body["items"]] == ["three", "two"]
    assert body["unread_count"] == 3 and body["seq"] == max(d.inbox_seq for d in items)
    assert body["preferences_url"].startswith("http")
    item = body["items"][0]
    assert item["id"] == items[2].id and item["title"] == "Hello Ada"
    assert item["data"] == {"reason": "three"} and item["read_at"] is None
    second = widget.call("GET", f"/inbox?limit=2&cursor={body['next_cursor']}").json
    assert [i["body"] for i in second["items"]] == ["one"] and second["next_cursor"] is None
    assert widget.call("GET", "/inbox/unread-count").json == {"count": 3}


def test_filters_and_actions_go_through_the_ledger(widget, items, inbox):
    one, two, three = items
    sent_seqs = [d.inbox_seq for d in items]
    seen = widget.call("POST", "/inbox/seen", json={"ids": [one.id, two.id]})
    assert seen.status_code == 200, seen.get_data(as_text=True)
    assert all(i["seen_at"] for i in seen.json["items"]) and seen.json["unread_count"] == 3
    read = widget.call("POST", f"/inbox/{one.id}/read").json
    assert read["items"][0]["read_at"] and read["unread_count"] == 2
    archived = widget.call("POST", f"/inbox/{two.id}/archive").json
    assert archived["items"][0]["archived_at"] and archived["unread_count"] == 1
    clicked = widget.call("POST", f"/inbox/{three.id}/clicked").json
    assert clicked["items"][0]["clicked_at"] and clicked["unread_count"] == 0

    def bodies(query: str) -> list[str]:
        return [i["body"] for i in widget.call("GET", f"/inbox?{query}").json["items"]]

    assert bodies("status=read") == ["three", "one"]
    assert bodies("status=unread") == []
    assert bodies("archived=true") == ["two"]
    assert bodies("archived=true&status=unread") == ["two"]

    assert widget.call("POST", "/inbox/read-all").json == {"marked": 1, "unread_count": 0}
    assert widget.call("POST", "/inbox/read-all").json == {"marked": 0, "unread_count": 0}
    org, ada = inbox["org"], inbox["ada"]
    one, two, three = deliveries_of(org.id, ada.id)
    assert (str(one.status), str(two.status), str(three.status)) == ("read", "read", "clicked")
    # Every change drew a new seq, above everything the recipient had when they were sent.
    assert min(d.inbox_seq for d in (one, two, three)) > max(sent_seqs)
    counts = assert_counters_match_ledger(org.id, StatScope.ORGANIZATION, org.id)
    assert counts["read"] == 3 and counts["clicked"] == 1


def test_bad_requests_are_problems_not_errors(widget, items):
    for query, field in [
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("status=new", "status"),
        ("archived=maybe", "archived"),
        ("cursor=not-a-cursor", "cursor"),
    ]:
        assert_problem(widget.call("GET", f"/inbox?{query}"), 422, field)
    assert_problem(widget.call("POST", "/inbox/seen", json={"ids": []}), 422, "ids")
    assert_problem(widget.call("POST", "/inbox/seen", json={"ids": ["x"]}), 422)
    assert_problem(widget.call("POST", "/inbox/seen", json={"ids": list(range(1, 102))}), 422)
    assert_problem(
        widget.call("POST", "/inbox/seen", data="{", content_type="application/json"), 400
    )
    assert_problem(widget.call("POST", f"/inbox/{2**63}/read"), 404)


def test_tokens_are_required_and_checked(client, widget, inbox, make_api):
    assert_problem(client.get("/api/v1/inbox"), 401)
    assert_problem(Widget(client, "nope").call("GET", "/inbox"), 401)
    nul = token_for(inbox["org"].id, "u-\x001")
    assert_problem(Widget(client, nul).call("GET", "/inbox"), 401)
    api = make_api(inbox["org"])
    db.session.commit()
    assert_problem(Widget(client, api.token).call("GET", "/inbox"), 401)
    # A recipient token does not open the rest of the API.
    assert_problem(widget.call("GET", "/recipients"), 401)


def test_another_recipients_or_organizations_item_is_not_found(
    client, widget, items, inbox, other_org, make_recipient, make_template, jobs
):
    org = inbox["org"]
    send_in_app(org.id, "u-2", jobs, reason="grace's")
    (graces,) = deliveries_of(org.id, inbox["grace"].id)
    make_template(other_org, "welcome", CONTENT)
    outsider = make_recipient(other_org, "u-1", name="Eve")
    db.session.commit()
    send_in_app(other_org.id, "u-1", jobs, reason="other org")
    (foreign,) = deliveries_of(other_org.id, outsider.id)
    for delivery_id in (graces.id, foreign.id):
        for action in ("read", "archive", "clicked"):
            assert_problem(widget.call("POST", f"/inbox/{delivery_id}/{action}"), 404)
        assert_problem(widget.call("POST", "/inbox/seen", json={"ids": [delivery_id]}), 404)
    # Nothing changed, and the other organization's recipient u-1 sees only their own item.
    assert deliveries_of(other_org.id, outsider.id)[0].read_at is None
    eve = Widget(client, token_for(other_org.id, "u-1")).call("GET", "/inbox").json
    assert [i["body"] for i in eve["items"]] == ["other org"]
    ada = widget.call("GET", "/inbox").json
    assert "other org" not in [i["body"] for i in ada["items"]]


def test_cors_answers_only_allowed_origins(client, inbox, other_org):
    org = inbox["org"]
    org.allowed_origins = ["https://app.example.com"]
    other_org.allowed_origins = ["https://globex.example.org"]
    db.session.commit()
    preflight = client.options(
        "/api/v1/inbox",
        headers={
            "Origin": "https://app.example.com",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert "Origin" in preflight.headers["Vary"]
    refused = client.options("/api/v1/inbox/seen", headers={"Origin": "https://evil.test"})
    assert "Access-Control-Allow-Origin" not in refused.headers

    token = token_for(org.id, "u-1")
    ok = Widget(client, token, "https://app.example.com").call("GET", "/inbox")
    assert ok.status_code == 200
    assert ok.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert "Origin" in ok.headers["Vary"]
    # Another organization's origin: the response is not shared with that page.
    other = Widget(client, token, "https://globex.example.org").call("GET", "/inbox")
    assert "Access-Control-Allow-Origin" not in other.headers
    # Errors are shared with allowed origins, so the widget can see it must refresh its token.
    expired = Widget(client, "bad", "https://app.example.com").call("GET", "/inbox")
    assert expired.status_code == 401
    assert expired.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    # Other API endpoints get no CORS headers.
    plain = client.get("/api/v1/recipients", headers={"Origin": "https://app.example.com"})
    assert "Access-Control-Allow-Origin" not in plain.headers
