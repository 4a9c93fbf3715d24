"""SMS segments: GSM-7 (160, then 153 per part) and UCS-2 (70, then 67 per part)."""

from __future__ import annotations

import pytest

from whistle_web.message_templates.sms import sms_count

CASES = [
    # text, encoding, units, segments
    ("", "GSM-7", 0, 0),
    ("Hello", "GSM-7", 5, 1),
    ("a" * 160, "GSM-7", 160, 1),
    ("a" * 161, "GSM-7", 161, 2),
    ("a" * 306, "GSM-7", 306, 2),
    ("a" * 307, "GSM-7", 307, 3),
    ("Ça coûte 5 €? [ok]", "UCS-2", 18, 1),  # û is not GSM
    ("Ça va 5 €? [ok] ü", "GSM-7", 20, 1),  # €, [ and ] take two septets
    ("€" * 80, "GSM-7", 160, 1),
    ("€" * 81, "GSM-7", 162, 2),
    # An escaped pair is never split: 152 + (2 + 151) + 1 needs three parts, not two.
    ("a" * 152 + "€" + "a" * 152, "GSM-7", 306, 3),
    ("ł" * 70, "UCS-2", 70, 1),
    ("ł" * 71, "UCS-2", 71, 2),
    ("ł" * 134, "UCS-2", 134, 2),
    ("ł" * 135, "UCS-2", 135, 3),
    ("😀" * 35, "UCS-2", 70, 1),  # an emoji is a surrogate pair: two units
    ("😀" * 36, "UCS-2", 72, 2),
    # A surrogate pair is never split either: 66 + (2 + 65) + 1.
    ("x" * 66 + "😀" + "x" * 66, "UCS-2", 134, 3),
]


@pytest.mark.parametrize(("text", "encoding", "units", "segments"), CASES)
def test_sms_count(text, encoding, units, segments):
    count = sms_count(text)
    assert (count.encoding, count.units, count.segments) == (encoding, units, segments)
    assert count.characters == len(text)
    limits = {"GSM-7": (160, 153), "UCS-2": (70, 67)}[encoding]
    assert count.per_segment == limits[segments > 1]


def test_per_segment_limits():
    assert sms_count("a" * 200).per_segment == 153
    assert sms_count("ł" * 100).per_segment == 67
