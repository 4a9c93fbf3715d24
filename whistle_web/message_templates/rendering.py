"""Render message templates in a Jinja sandbox, compiled once per batch.

Templates are written by staff and must not reach Python internals: the immutable sandbox
refuses attribute access to private members and mutation of the context. HTML fields are
autoescaped, text fields (subject, SMS, push) are not. A template that fails to compile or
render fails only the delivery it was rendering, with Jinja's message and line.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError, Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

HTML_FIELDS = frozenset({"html"})


def _finalize(value: Any) -> Any:
    """A missing profile field renders as nothing, never as the word "None"."""
    return "" if value is None else value


# Limits per rendered field: a template is staff input, and one slow or huge field must not
# hold a worker (the delivery fails with a message instead).
RENDER_SECONDS = 2.0
MAX_OUTPUT_CHARS = 1_000_000
MAX_RANGE = 10_000
_deadline: ContextVar[float | None] = ContextVar("render_deadline", default=None)


class RenderLimitExceeded(TemplateError):
    """A field took too long or grew too large."""


def _check_deadline() -> None:
    deadline = _deadline.get()
    if deadline is not None and time.monotonic() > deadline:
        raise RenderLimitExceeded(f"rendering took longer than {RENDER_SECONDS:g} s")


def _limited_range(*args: int) -> Iterator[int]:
    """``range`` for templates: at most MAX_RANGE items, and it watches the clock."""
    numbers = range(*args)
    if len(numbers) > MAX_RANGE:
        raise RenderLimitExceeded(f"range() is limited to {MAX_RANGE:,} items")
    for index, number in enumerate(numbers):
        if index % 256 == 0:
            _check_deadline()
        yield number


class _MessageEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, reading plain dicts (the whole render context) by key first.

    ``{{ recipient.name }}`` on a dict otherwise costs a failed attribute lookup (an
    exception) before the item lookup; a dict's values are data, always safe to return.
    A key named like a dict method (``attributes.items``) now reads the data, not the method.
    """

    def getattr(self, obj: Any, attribute: str) -> Any:
        if type(obj) is dict:
            value = obj.get(attribute, _MISSING)
            if value is not _MISSING:
                return value
            if not hasattr(dict, attribute):
                # A missing key (``attributes.plan`` for a recipient without one): what the
                # sandbox gives after two more failed lookups.
                return self.undefined(obj=obj, name=attribute)
        return super().getattr(obj, attribute)


_MISSING = object()


def _environment(*, autoescape: bool) -> ImmutableSandboxedEnvironment:
    env = _MessageEnvironment(autoescape=autoescape, undefined=Undefined, finalize=_finalize)
    env.policies["truncate.leeway"] = 0
    env.globals["range"] = _limited_range
    return env


_text_env = _environment(autoescape=False)
_html_env = _environment(autoescape=True)


class RenderError(Exception):
    """A template failed to compile or render; the message says where."""


def limited_concat(parts: Iterable[str]) -> str:
    """Join what a template yields, checking the clock and the size at every piece.

    Raises:
        RenderLimitExceeded: rendering took longer than RENDER_SECONDS or grew too large.
    """
    token = _deadline.set(time.monotonic() + RENDER_SECONDS)
    try:
        pieces: list[str] = []
        size = 0
        for count, part in enumerate(parts, 1):
            size += len(part)
            if size > MAX_OUTPUT_CHARS:
                raise RenderLimitExceeded(f"output is larger than {MAX_OUTPUT_CHARS:,} characters")
            if count % 64 == 0:  # the clock every 64 pieces: a short field never reads it
                _check_deadline()
            pieces.append(part)
        return "".join(pieces)
    finally:
        _deadline.reset(token)


def _describe(error: TemplateError, channel: str, field_name: str) -> str:
    line = getattr(error, "lineno", None)
    where = f"{channel}.{field_name}" + (f" line {line}" if line else "")
    return f"{where}: {error.message or type(error).__name__}"


@dataclass
class CompiledContent:
    """A template version's content with every field compiled (or the error it gave)."""

    fields: dict[str, dict[str, Any]]

    def render(self, channel: str, context: dict[str, Any]) -> dict[str, Any]:
        """Render one channel's fields.

        Raises:
            RenderError: a field failed to compile or render.
        """
        rendered: dict[str, Any] = {}
        for field_name, compiled in self.fields.get(channel, {}).items():
            if isinstance(compiled, RenderError):
                raise compiled
            if compiled is None:
                continue
            try:
                rendered[field_name] = limited_concat(compiled.generate(context))
            except TemplateError as error:
                raise RenderError(_describe(error, channel, field_name)) from error
            except (TypeError, ValueError, ArithmeticError) as error:
                raise RenderError(f"{channel}.{field_name}: {error}") from error
        return rendered


def compile_content(content: dict[str, dict[str, Any]]) -> CompiledContent:
    """Compile every string field of every channel once."""
    fields: dict[str, dict[str, Any]] = {}
    for channel, channel_fields in content.items():
        if not isinstance(channel_fields, dict):
            continue
        compiled: dict[str, Any] = {}
        for field_name, source in channel_fields.items():
            if not isinstance(source, str):
                compiled[field_name] = None
                continue
            env = _html_env if field_name in HTML_FIELDS else _text_env
            try:
                compiled[field_name] = env.from_string(source)
            except TemplateError as error:
                compiled[field_name] = RenderError(_describe(error, channel, field_name))
        fields[channel] = compiled
    return CompiledContent(fields)
