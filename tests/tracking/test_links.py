"""Signed tracking links and the HTML rewriter (pure functions, no requests)."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import pytest

from whistle_web.tenancy import organization_scope
from whistle_web.tracking import links

SECRET = "test-secret-for-tracking-links-0123456789"
BASE = "https://mail.example.com"


def token_of(url: str, prefix: str, suffix: str = "") -> str:
    path = urlsplit(url).path
    assert path.startswith(prefix) and path.endswith(suffix)
    return path[len(prefix) : len(path) - len(suffix)]


def click_target(url: str) -> str:
    payload = links.verify_click(token_of(url, "/t/c/"), secret=SECRET)
    assert payload is not None
    return payload.url


def test_click_link_round_trip():
    url = links.click_url(BASE, SECRET, 42, "https://shop.example/p?x=1&y=é", organization_id=7)
    assert url.startswith(f"{BASE}/t/c/")
    payload = links.verify(token_of(url, "/t/c/"), links.CLICK, secret=SECRET)
    assert payload == links.LinkPayload(
        "click", 7, delivery_id=42, url="https://shop.example/p?x=1&y=é"
    )


def test_open_and_unsubscribe_round_trip():
    pixel = links.open_pixel_url(BASE + "/", SECRET, 42, organization_id=7)
    assert pixel.startswith(f"{BASE}/t/o/") and pixel.endswith(".gif")
    assert links.verify_open(token_of(pixel, "/t/o/", ".gif"), secret=SECRET) == (
        links.LinkPayload("open", 7, delivery_id=42)
    )
    unsubscribe = links.unsubscribe_url(BASE, SECRET, 7, 99, 42)
    assert links.verify_unsubscribe(token_of(unsubscribe, "/t/u/"), secret=SECRET) == (
        links.LinkPayload("unsubscribe", 7, delivery_id=42, recipient_id=99)
    )
    without_delivery = links.unsubscribe_url(BASE, SECRET, 7, 99)
    payload = links.verify_unsubscribe(token_of(without_delivery, "/t/u/"), secret=SECRET)
    assert payload is not None and payload.delivery_id is None and payload.recipient_id == 99


def test_preferences_link_round_trip():
    url = links.preferences_url(BASE + "/", SECRET, 7, 99)
    assert url.startswith(f"{BASE}/p/")
    token = token_of(url, "/p/")
    assert links.verify_preferences(token, secret=SECRET) == (
        links.LinkPayload("preferences", 7, recipient_id=99)
    )
    # Same shape as an open payload, but each purpose has its own key.
    assert links.verify_open(token, secret=SECRET) is None
    assert links.verify_unsubscribe(token, secret=SECRET) is None
    open_token = token_of(
        links.open_pixel_url(BASE, SECRET, 99, organization_id=7), "/t/o/", ".gif"
    )
    assert links.verify_preferences(open_token, secret=SECRET) is None
    assert links.verify_preferences(flip(token, 3), secret=SECRET) is None
    for payload in ([7], [0, 99], [7, 99, None], [7, True], ["7", 99]):
        signed = links.sign(SECRET, links.PREFERENCES, payload)
        assert links.verify_preferences(signed, secret=SECRET) is None
    with pytest.raises(ValueError):
        links.preferences_url(BASE, SECRET, 7, 0)


def test_tokens_are_compact_and_url_safe():
    token = token_of(links.open_pixel_url(BASE, SECRET, 123456, organization_id=789), "/t/o/")
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", token)
    assert len(token) < 50
    assert len(token_of(links.unsubscribe_url(BASE, SECRET, 789, 123456, 654321), "/t/u/")) < 60


def test_the_organization_defaults_to_the_active_scope(org):
    with organization_scope(org.id):
        url = links.open_pixel_url(BASE, SECRET, 5)
    payload = links.verify_open(token_of(url, "/t/o/", ".gif"), secret=SECRET)
    assert payload is not None and payload.organization_id == org.id
    with pytest.raises(ValueError, match="organization"):
        links.open_pixel_url(BASE, SECRET, 5)


def flip(text: str, index: int) -> str:
    return text[:index] + ("A" if text[index] != "A" else "B") + text[index + 1 :]


def test_tampered_tokens_do_not_verify():
    token = token_of(
        links.click_url(BASE, SECRET, 1, "https://a.example/", organization_id=1), "/t/c/"
    )
    body, mac = token.split(".")
    assert links.verify_click(token, secret=SECRET) is not None
    assert links.verify_click(flip(token, 3), secret=SECRET) is None  # payload changed
    assert links.verify_click(f"{body}.{flip(mac, 0)}", secret=SECRET) is None  # mac changed
    assert links.verify_click(body, secret=SECRET) is None
    assert links.verify_click(f"{body}.", secret=SECRET) is None
    assert links.verify_click(token + "x", secret=SECRET) is None
    assert links.verify_click(token, secret=SECRET + "x") is None  # another deployment
    assert links.verify_click("not a token", secret=SECRET) is None
    assert links.verify_click("a" * 10_000 + ".b", secret=SECRET) is None
    # A forged payload signed with another secret naming another organization.
    forged = links.sign("attacker", links.CLICK, [2, 1, "https://evil.example/"])
    assert links.verify_click(forged, secret=SECRET) is None


def test_only_the_exact_spelling_of_a_token_verifies():
    # The mac's last base64 character carries spare bits; no other spelling may verify.
    token = token_of(links.open_pixel_url(BASE, SECRET, 1, organization_id=1), "/t/o/", ".gif")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    variants = [token[:-1] + c for c in alphabet]
    assert [v for v in variants if links.verify_open(v, secret=SECRET)] == [token]


def test_a_token_only_verifies_for_its_own_purpose():
    open_token = token_of(links.open_pixel_url(BASE, SECRET, 1, organization_id=1), "/t/o/", ".gif")
    assert links.verify_open(open_token, secret=SECRET) is not None
    assert links.verify_click(open_token, secret=SECRET) is None
    assert links.verify_unsubscribe(open_token, secret=SECRET) is None
    # Same shape as an unsubscribe payload, signed for clicks: still refused.
    click_shaped = links.sign(SECRET, links.CLICK, [1, 2, None])
    assert links.verify_unsubscribe(click_shaped, secret=SECRET) is None


def test_payloads_of_the_wrong_shape_are_refused_even_when_signed():
    for payload in ([1], [0, 1], [True, 1], ["1", 1], [1, 1, 1], {"o": 1}):
        assert links.verify_open(links.sign(SECRET, links.OPEN, payload), secret=SECRET) is None
    bad_target = links.sign(SECRET, links.CLICK, [1, 1, "javascript:alert(1)"])
    assert links.verify_click(bad_target, secret=SECRET) is None


@pytest.mark.parametrize(
    "target",
    [
        "javascript:alert(1)",
        "mailto:a@example.com",
        "/relative/path",
        "//evil.example/",
        "http://",
        "ftp://files.example/",
        "https://ok.example/\r\nSet-Cookie: x=1",
        "",
    ],
)
def test_click_url_only_accepts_http_and_https_targets(target):
    with pytest.raises(ValueError):
        links.click_url(BASE, SECRET, 1, target, organization_id=1)


def test_click_url_accepts_uppercase_schemes():
    url = links.click_url(BASE, SECRET, 1, "HTTPS://Example.com/A", organization_id=1)
    assert click_target(url) == "HTTPS://Example.com/A"


def rewrite(html: str) -> str:
    return links.rewrite_html(html, base_url=BASE, secret=SECRET, delivery_id=9, organization_id=3)


def hrefs(html: str) -> list[str]:
    return re.findall(r"""href\s*=\s*["']?([^"'\s>]+)""", html, flags=re.IGNORECASE)


def test_rewrite_html_tracks_http_links_with_any_quoting():
    html = (
        '<p><a href="https://a.example/one">1</a> '
        "<a class='btn' href='http://b.example/two' target=_blank>2</a> "
        "<A HREF=https://c.example/three>3</A></p>"
    )
    out = rewrite(html)
    found = hrefs(out)
    assert len(found) == 3 and all(h.startswith(f"{BASE}/t/c/") for h in found)
    assert [click_target(h) for h in found] == [
        "https://a.example/one",
        "http://b.example/two",
        "https://c.example/three",
    ]
    assert "class='btn'" in out and "target=_blank" in out and ">2</a>" in out
    assert "href='https://mail.example.com/t/c/" in out  # the single quotes are kept
    assert '<A HREF="https://mail.example.com/t/c/' in out  # a bare value gets quoted


def test_rewrite_html_decodes_entities_in_hrefs():
    out = rewrite('<a href="https://a.example/?x=1&amp;y=2&#38;z=%20 ">go</a>')
    assert click_target(hrefs(out)[0]) == "https://a.example/?x=1&y=2&z=%20"


def test_rewrite_html_leaves_other_links_alone():
    unsubscribe = links.unsubscribe_url(BASE, SECRET, 3, 4, 9)
    preferences = links.preferences_url(BASE, SECRET, 3, 4)
    html = (
        '<a href="mailto:help@example.com">m</a>'
        '<a href="tel:+15555550100">t</a>'
        '<a href="#top">anchor</a>'
        '<a href="/relative">rel</a>'
        f'<a href="{unsubscribe}">unsubscribe</a>'
        f'<a href="{preferences}">preferences</a>'
        '<a name="no-href">x</a>'
        '<a data-href="https://x.example/" title="href=https://y.example/">data</a>'
    )
    out = rewrite(html)
    assert out.startswith(html)  # only the pixel was added
    assert "/t/c/" not in out


def test_rewrite_html_handles_gt_inside_attributes_and_first_href_wins():
    out = rewrite('<a title="a > b" href="https://a.example/" href="https://b.example/">x</a>')
    assert out.startswith('<a title="a > b" href="https://mail.example.com/t/c/')
    assert 'href="https://b.example/"' in out
    assert click_target(hrefs(out)[0]) == "https://a.example/"


def test_rewrite_html_does_not_track_twice():
    once = rewrite('<body><a href="https://a.example/">x</a></body>')
    assert rewrite(once) == once


def test_rewrite_html_puts_the_pixel_before_the_closing_body():
    out = rewrite("<html><body><p>Hi</p></BODY></html>")
    pixel = links.open_pixel_url(BASE, SECRET, 9, organization_id=3)
    assert out == (
        f'<html><body><p>Hi</p><img src="{pixel}" width="1" height="1" alt="" '
        'style="display:none"></BODY></html>'
    )
    fragment = rewrite("<p>Hi</p>")
    assert fragment.startswith("<p>Hi</p><img src=") and fragment.endswith('style="display:none">')
