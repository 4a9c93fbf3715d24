"""The SMTP provider's own MIME writer, read back by the standard library's parser."""

from __future__ import annotations

from email import message_from_bytes, policy

import pytest

from whistle_web.channels import mime


def parse(data: bytes):  # type: ignore[no-untyped-def]
    return message_from_bytes(data, policy=policy.default)


def lines(data: bytes) -> list[bytes]:
    assert b"\n" not in data.replace(b"\r\n", b"")  # CRLF only, no bare LF or CR
    assert b"\r" not in data.replace(b"\r\n", b"")
    return data.split(b"\r\n")


def test_multipart_alternative_round_trips() -> None:
    text = "Grüße, Ada! 🎉\nSecond line.\n" + "long " * 200
    html = "<p>Grüße, <b>Ada</b>! 🎉</p>"
    data = mime.build(
        [mime.header("To", "ada@example.com"), mime.subject_header("Hello")], text=text, html=html
    )
    message = parse(data)
    assert message.get_content_type() == "multipart/alternative"
    assert message["MIME-Version"] == "1.0"
    plain, rich = message.iter_parts()
    assert (plain.get_content_type(), rich.get_content_type()) == ("text/plain", "text/html")
    assert plain.get_content() == text
    assert rich.get_content() == html
    assert plain["Content-Transfer-Encoding"] == "base64"
    assert max(len(line) for line in lines(data)) <= 78


@pytest.mark.parametrize(
    "subject",
    [
        "Plain ASCII",
        "Ünïcödé subject with an emoji 🚀 and more words " * 3,
        "A long ASCII subject that needs folding because it goes well past seventy-eight "
        "characters in all " * 4,
        "double  spaces  stay  exactly  as  written  even  when  the  line  is  folded  at  a space",
    ],
)
def test_subjects_round_trip_and_fold(subject: str) -> None:
    data = mime.build([mime.subject_header(subject)], text="x", html=None)
    assert parse(data)["Subject"] == subject
    assert data.isascii()
    for line in lines(data):
        assert line.strip() or line == b""  # no whitespace-only continuation lines
        if "  " not in subject:  # never folded before an empty word, so may run a bit over
            assert len(line) <= 78


def test_single_parts() -> None:
    html_only = parse(mime.build([mime.header("To", "a@example.com")], text=None, html="<p>x</p>"))
    assert html_only.get_content_type() == "text/html"
    assert html_only.get_content() == "<p>x</p>"
    empty = parse(mime.build([mime.header("To", "a@example.com")], text="", html=None))
    assert empty.get_content_type() == "text/plain"
    assert empty.get_content() == ""


def test_a_header_longer_than_smtp_allows_is_refused() -> None:
    assert mime.header("X-Long", "<" + "a" * 900 + ">").startswith("X-Long: <aaa")
    with pytest.raises(ValueError, match="longer than 998"):
        mime.header("List-Unsubscribe", "<https://whistle.example/" + "a" * 1000 + ">")


def test_boundaries_differ_between_messages() -> None:
    first = parse(mime.build([], text="a", html="b")).get_boundary()
    second = parse(mime.build([], text="a", html="b")).get_boundary()
    assert first != second and first.startswith("=_whistle_")
