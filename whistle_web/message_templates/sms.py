"""How many SMS segments a text takes: GSM-7 (160/153 per segment) or UCS-2 (70/67).

A text made only of the GSM 03.38 alphabet is sent in 7-bit encoding: 160 septets fit one
message; a longer text is split into parts of 153 (the rest carries the concatenation
header). The extension characters (``^{}[]~|\\€`` and form feed) take two septets, and a
pair is never split across parts. Any other character switches the whole text to UCS-2:
70 UTF-16 code units in one message, 67 per part, and a surrogate pair (an emoji) is never
split. ``static/js/templates.js`` counts the same way while staff type.
"""

from __future__ import annotations

from dataclasses import dataclass

GSM_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM_EXTENDED = frozenset("^{}\\[~]|€\f")
LIMITS = {"GSM-7": (160, 153), "UCS-2": (70, 67)}


@dataclass(frozen=True)
class SmsCount:
    encoding: str  # "GSM-7" or "UCS-2"
    characters: int  # what a person counts (code points)
    units: int  # septets (GSM-7) or UTF-16 code units (UCS-2)
    segments: int
    per_segment: int  # 160/70 for a single message, 153/67 once it is split


def is_gsm7(text: str) -> bool:
    return all(c in GSM_BASIC or c in GSM_EXTENDED for c in text)


def sms_count(text: str) -> SmsCount:
    """Count ``text`` as an SMS: encoding, length in units, and the segments it needs."""
    if is_gsm7(text):
        encoding = "GSM-7"
        units = [2 if c in GSM_EXTENDED else 1 for c in text]
    else:
        encoding = "UCS-2"
        units = [2 if ord(c) > 0xFFFF else 1 for c in text]
    single, multi = LIMITS[encoding]
    total = sum(units)
    if total == 0:
        segments = 0
    elif total <= single:
        segments = 1
    else:
        segments, used = 1, 0
        for size in units:  # a two-unit character is never split across parts
            if used + size > multi:
                segments += 1
                used = 0
            used += size
    return SmsCount(
        encoding=encoding,
        characters=len(text),
        units=total,
        segments=segments,
        per_segment=single if segments <= 1 else multi,
    )
