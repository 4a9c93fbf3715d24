"""Open pixel, click redirect and unsubscribe pages through the test client."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import pytest
from sqlalchemy import func, select

from tests.tracking import assert_counters_match_ledger, events_of, make_delivery, reload
from whistle_web.deliveries.ledger import record_event
from whistle_web.deliveries.status import DeliveryStatus
from whistle_web.extensions import db
from whistle_web.models import AuditLog, Recipient
from whistle_web.tenancy import organization_scope
from whistle_web.tracking import links
from whistle_web.tracking.views import TRANSPARENT_GIF

S = DeliveryStatus


@pytest.fixture
def secret(app):
    return app.config["SECRET_KEY"]


@pytest.fixture
def base_url(app):
    return app.config["WHISTLE_BASE_URL"]


@pytest.fixture
def recipient(org, make_recipient):
    return make_recipient(org, "ada", email="ada@example.com")


@pytest.fixture
def delivery(org, recipient, make_send_request):
    return make_delivery(org, recipient, make_send_request(org))


def path_of(url: str) -> str:
    return urlsplit(url).path


def pixel_path(base_url, secret, org, delivery) -> str:
    return path_of(links.open_pixel_url(base_url, secret, delivery.id, organization_id=org.id))


def click_path(base_url, secret, org, delivery, target="https://shop.example/sale?a=1&b=2"):
    return path_of(links.click_url(base_url, secret, delivery.id, target, organization_id=org.id))


def unsubscribe_path(base_url, secret, org_id, recipient_id, delivery_id=None) -> str:
    return path_of(links.unsubscribe_url(base_url, secret, org_id, recipient_id, delivery_id))


# --- open pixel -------------------------------------------------------------------------------


def test_the_pixel_marks_the_delivery_seen_and_counts_it(client, org, delivery, base_url, secret):
    response = client.get(pixel_path(base_url, secret, org, delivery))
    assert response.status_code == 200
    assert response.mimetype == "image/gif"
    assert response.data == TRANSPARENT_GIF and response.data.startswith(b"GIF89a")
    assert response.data[6:10] == b"\x01\x00\x01\x00"  # 1×1
    assert "no-store" in response.headers["Cache-Control"]

    seen = reload(org, delivery)
    assert seen.status == S.SEEN
    assert seen.seen_at is not None and seen.delivered_at is not None
    assert [e.type for e in events_of(org, delivery)] == ["opened"]
    counters = assert_counters_match_ledger(org, delivery.template_id)
    assert counters["email"]["seen"] == 1 and counters["email"]["delivered"] == 1


def test_a_second_open_changes_no_counter(client, org, delivery, base_url, secret):
    path = pixel_path(base_url, secret, org, delivery)
    client.get(path)
    client.get(path)
    assert [e.type for e in events_of(org, delivery)] == ["opened", "opened"]
    assert assert_counters_match_ledger(org, delivery.template_id)["email"]["seen"] == 1


def test_an_invalid_pixel_token_still_gets_the_image_and_records_nothing(
    client, org, delivery, base_url, secret
):
    path = pixel_path(base_url, secret, org, delivery)
    tampered = path[:-8] + ("A" if path[-8] != "A" else "B") + path[-7:]
    click_token = click_path(base_url, secret, org, delivery).removeprefix("/t/c/")
    # A click token is no pixel token, though both are signed by Whistle.
    for bad in (tampered, "/t/o/garbage.gif", f"/t/o/{click_token}.gif"):
        response = client.get(bad)
        assert response.status_code == 200
        assert response.data == TRANSPARENT_GIF
    assert reload(org, delivery).status == S.SENT
    assert events_of(org, delivery) == []


def test_a_head_request_for_the_pixel_records_nothing(client, org, delivery, base_url, secret):
    response = client.head(pixel_path(base_url, secret, org, delivery))
    assert response.status_code == 200
    assert events_of(org, delivery) == []


# --- click ------------------------------------------------------------------------------------


def test_a_click_redirects_to_the_signed_target_and_moves_the_ledger(
    client, org, delivery, base_url, secret
):
    target = "https://shop.example/sale?a=1&b=2"
    response = client.get(click_path(base_url, secret, org, delivery, target))
    assert response.status_code == 302
    assert response.headers["Location"] == target

    clicked = reload(org, delivery)
    assert clicked.status == S.CLICKED
    assert clicked.clicked_at is not None and clicked.seen_at is not None
    events = events_of(org, delivery)
    assert [(e.type, e.data) for e in events] == [("clicked", {"url": target})]
    counters = assert_counters_match_ledger(org, delivery.template_id)
    assert counters["email"]["clicked"] == 1 and counters["email"]["seen"] == 1


def test_a_click_on_a_non_ascii_target_redirects_to_its_uri(
    client, org, delivery, base_url, secret
):
    response = client.get(click_path(base_url, secret, org, delivery, "https://shop.example/café"))
    assert response.status_code == 302
    assert response.headers["Location"] == "https://shop.example/caf%C3%A9"


def test_a_late_delivered_after_a_click_leaves_the_delivery_clicked(
    client, org, delivery, base_url, secret
):
    client.get(click_path(base_url, secret, org, delivery))
    client.get(pixel_path(base_url, secret, org, delivery))  # the images loaded late
    with organization_scope(org.id):
        record_event(delivery.id, "delivered")
        db.session.commit()
    late = reload(org, delivery)
    assert late.status == S.CLICKED
    assert [e.type for e in events_of(org, delivery)] == ["clicked", "opened", "delivered"]
    counters = assert_counters_match_ledger(org, delivery.template_id)
    assert counters["email"]["delivered"] == 1 and counters["email"]["clicked"] == 1


def test_a_tampered_click_token_is_a_404_never_a_redirect(client, org, delivery, base_url, secret):
    path = click_path(base_url, secret, org, delivery)
    token = path.removeprefix("/t/c/")
    body, mac = token.split(".")
    forged_body = links.sign(
        secret + "x", links.CLICK, [org.id, delivery.id, "https://evil.example/"]
    )
    for bad in (
        f"/t/c/{body}.{mac[:-1]}{'A' if mac[-1] != 'A' else 'B'}",
        f"/t/c/{forged_body}",
        f"/t/c/{forged_body.split('.')[0]}.{mac}",  # another target with the old signature
        "/t/c/nonsense",
        pixel_path(base_url, secret, org, delivery).replace("/t/o/", "/t/c/").removesuffix(".gif"),
    ):
        response = client.get(bad)
        assert response.status_code == 404, bad
        assert "Location" not in response.headers
        assert "This link is not valid" in response.get_data(as_text=True)
    assert reload(org, delivery).status == S.SENT
    assert events_of(org, delivery) == []


def test_a_head_request_for_a_click_redirects_without_recording(
    client, org, delivery, base_url, secret
):
    response = client.head(click_path(base_url, secret, org, delivery))
    assert response.status_code == 302
    assert events_of(org, delivery) == []


def test_a_click_on_a_deleted_delivery_still_redirects(client, org, base_url, secret):
    path = path_of(
        links.click_url(base_url, secret, 987654321, "https://a.example/", organization_id=org.id)
    )
    response = client.get(path)
    assert response.status_code == 302 and response.headers["Location"] == "https://a.example/"


# --- unsubscribe ------------------------------------------------------------------------------


def csrf_from(page: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert match, "no CSRF token on the page"
    return match.group(1)


def unsubscribed_at(org, recipient):
    with organization_scope(org.id):
        db.session.expire_all()
        return db.session.get(Recipient, recipient.id).unsubscribed_at


def test_the_unsubscribe_page_asks_first_then_unsubscribes(
    client, org, recipient, delivery, base_url, secret
):
    path = unsubscribe_path(base_url, secret, org.id, recipient.id, delivery.id)
    page = client.get(path)
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert "Acme" in html and "<form" in html and 'method="post"' in html
    assert page.headers["Cache-Control"] == "no-store"
    assert "style=" not in html and "<script" not in html  # the console's CSP applies
    assert unsubscribed_at(org, recipient) is None  # a GET changes nothing

    done = client.post(path, data={"csrf_token": csrf_from(html)})
    assert done.status_code == 200
    assert "You are unsubscribed" in done.get_data(as_text=True)
    assert unsubscribed_at(org, recipient) is not None
    assert [(e.type, e.data) for e in events_of(org, delivery)] == [
        ("unsubscribed", {"one_click": False})
    ]
    with organization_scope(org.id):
        audit = db.session.scalars(select(AuditLog)).all()
    assert [(a.action, a.target_id) for a in audit] == [
        ("recipient.unsubscribed", str(recipient.id))
    ]
    again = client.get(path)
    assert "You are unsubscribed" in again.get_data(as_text=True)


def test_the_unsubscribe_form_needs_its_csrf_token(client, org, recipient, base_url, secret):
    path = unsubscribe_path(base_url, secret, org.id, recipient.id)
    client.get(path)
    for data in ({}, {"csrf_token": "forged"}, {"List-Unsubscribe": "One-Click", "x": "1"}):
        response = client.post(path, data=data)
        assert response.status_code == 303  # back to the form, with a message
        assert urlsplit(response.headers["Location"]).path == path
    assert unsubscribed_at(org, recipient) is None
    page = client.get(path).get_data(as_text=True)
    assert "The form expired" in page


def test_one_click_unsubscribe_needs_no_csrf_token(
    client, org, recipient, delivery, base_url, secret
):
    path = unsubscribe_path(base_url, secret, org.id, recipient.id, delivery.id)
    # A mail provider's POST: no cookies, no form token, just the RFC 8058 body.
    response = client.post(
        path,
        data="List-Unsubscribe=One-Click",
        content_type="application/x-www-form-urlencoded",
    )
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    first = unsubscribed_at(org, recipient)
    assert first is not None

    # Providers retry: a repeat is fine and counts once.
    assert client.post(path, data={"List-Unsubscribe": "One-Click"}).status_code == 200
    assert unsubscribed_at(org, recipient) == first
    assert [(e.type, e.data) for e in events_of(org, delivery)] == [
        ("unsubscribed", {"one_click": True})
    ]
    with organization_scope(org.id):
        assert counted_unsubscribes(delivery.template_id) == 1


def counted_unsubscribes(template_id: int) -> int:
    from whistle_web.deliveries.models import DeliveryStat, StatScope

    return db.session.scalar(
        select(func.coalesce(func.sum(DeliveryStat.value), 0)).where(
            DeliveryStat.scope == StatScope.TEMPLATE,
            DeliveryStat.scope_id == template_id,
            DeliveryStat.metric == "event:unsubscribed",
        )
    )


def test_invalid_unsubscribe_tokens_are_404(client, org, recipient, base_url, secret):
    path = unsubscribe_path(base_url, secret, org.id, recipient.id)
    tampered = path[:-1] + ("A" if path[-1] != "A" else "B")
    assert client.get(tampered).status_code == 404
    response = client.post(tampered, data={"List-Unsubscribe": "One-Click"})
    assert response.status_code == 404
    assert client.get("/t/u/nonsense").status_code == 404
    assert unsubscribed_at(org, recipient) is None


def test_an_unsubscribe_token_of_another_organization_cannot_touch_this_one(
    client, org, other_org, recipient, base_url, secret
):
    # Signed by Whistle, but for organization B: the recipient id is looked up inside B.
    path = unsubscribe_path(base_url, secret, other_org.id, recipient.id)
    assert client.get(path).status_code == 404
    response = client.post(path, data={"List-Unsubscribe": "One-Click"})
    assert response.status_code == 404
    assert unsubscribed_at(org, recipient) is None
    # And organization A's own link still works.
    own = unsubscribe_path(base_url, secret, org.id, recipient.id)
    assert client.post(own, data={"List-Unsubscribe": "One-Click"}).status_code == 200
    assert unsubscribed_at(org, recipient) is not None


def test_the_form_works_over_https_with_the_strict_referrer_check(
    client, org, recipient, base_url, secret
):
    path = unsubscribe_path(base_url, secret, org.id, recipient.id)
    page = client.get(path, base_url="https://whistle.test")
    # The page keeps its referrer for same-origin requests only: the form post carries it,
    # other sites never see the link.
    assert page.headers["Referrer-Policy"] == "same-origin"
    token = csrf_from(page.get_data(as_text=True))
    response = client.post(
        path,
        base_url="https://whistle.test",
        data={"csrf_token": token},
        headers={"Referer": f"https://whistle.test{path}"},
    )
    assert response.status_code == 200
    assert unsubscribed_at(org, recipient) is not None
