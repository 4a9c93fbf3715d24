"""The organization's email layout: header and footer HTML and a brand colour.

Stored in ``Organization.settings["email_layout"]`` and wrapped around the HTML of every
email the organization sends (the dispatcher), previews and test sends. Header and footer
are templates rendered in the same sandbox as message templates (autoescaped HTML), with the
same context plus ``brand_color``. The colour is only ever written as a validated
``#rrggbb``, so it cannot break out of the style attribute it lands in.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from whistle_web.message_templates.rendering import CompiledContent, RenderError, compile_content

SETTINGS_KEY = "email_layout"
FIELDS = ("header_html", "footer_html", "brand_color")
MAX_HTML_CHARS = 100_000
COLOUR = re.compile(r"#[0-9a-fA-F]{6}")
_BODY_START = re.compile(r"<body\b[^>]*>", re.IGNORECASE)
_BODY_END = re.compile(r"</body\s*>", re.IGNORECASE)


def layout_settings(settings: dict[str, Any] | None) -> dict[str, str]:
    """The layout part of an organization's settings, every field a string ("" if unset)."""
    stored = (settings or {}).get(SETTINGS_KEY)
    stored = stored if isinstance(stored, dict) else {}
    return {name: str(stored.get(name) or "") for name in FIELDS}


def valid_colour(value: str) -> bool:
    return COLOUR.fullmatch(value) is not None


@dataclass(frozen=True)
class EmailLayout:
    """A compiled layout, applied to one email's HTML at a time."""

    compiled: CompiledContent
    brand_color: str  # "" or a validated #rrggbb

    def _part(self, name: str, context: dict[str, Any]) -> str:
        try:
            return str(self.compiled.render(name, context).get("html", ""))
        except RenderError as error:
            where = str(error).removeprefix(f"{name}.html")
            raise RenderError(f"email layout {name}{where}") from error

    def apply(self, html: str, context: dict[str, Any]) -> str:
        """``html`` inside the layout: the header first, then the body, then the footer.

        A full document keeps its own ``<head>`` and ``<body>``: the layout goes inside the
        body. A fragment is wrapped in a minimal document.

        Raises:
            RenderError: the header or footer failed to render.
        """
        context = {**context, "brand_color": self.brand_color}
        header = self._part("header", context)
        footer = self._part("footer", context)
        accent = f"border-top:4px solid {self.brand_color};" if self.brand_color else ""
        top = (
            f'<div class="whistle-layout" style="max-width:600px;margin:0 auto;{accent}">'
            f'<div class="whistle-header">{header}</div><div class="whistle-content">'
        )
        bottom = f'</div><div class="whistle-footer">{footer}</div></div>'
        start = _BODY_START.search(html)
        ends = list(_BODY_END.finditer(html))
        if start is not None and ends and ends[-1].start() >= start.end():
            at, end = start.end(), ends[-1].start()
            return html[:at] + top + html[at:end] + bottom + html[end:]
        return (
            '<!doctype html><html><head><meta charset="utf-8"></head><body>'
            f"{top}{html}{bottom}</body></html>"
        )


def compile_layout(settings: dict[str, Any] | None) -> EmailLayout | None:
    """The organization's layout compiled once, or None when it has none."""
    layout = layout_settings(settings)
    if not any(layout.values()):
        return None
    return _compiled(json.dumps(layout, sort_keys=True))


@lru_cache(maxsize=128)
def _compiled(layout_json: str) -> EmailLayout:
    layout = json.loads(layout_json)
    colour = layout["brand_color"] if valid_colour(layout["brand_color"]) else ""
    compiled = compile_content(
        {"header": {"html": layout["header_html"]}, "footer": {"html": layout["footer_html"]}}
    )
    return EmailLayout(compiled=compiled, brand_color=colour.lower())


def apply_layout(html: str, settings: dict[str, Any] | None, context: dict[str, Any]) -> str:
    """``html`` wrapped in the layout of ``settings`` (unchanged when there is none).

    Raises:
        RenderError: the header or footer failed to render.
    """
    layout = compile_layout(settings)
    return html if layout is None else layout.apply(html, context)
