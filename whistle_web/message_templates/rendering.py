"""Render message templates in a Jinja sandbox, compiled once per batch.

Templates are written by staff and must not reach Python internals: the immutable sandbox
refuses attribute access to private members and mutation of the context. HTML fields are
autoescaped, text fields (subject, SMS, push) are not. A template that fails to compile or
render fails only the delivery it was rendering, with Jinja's message and line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError, Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

HTML_FIELDS = frozenset({"html"})


def _finalize(value: Any) -> Any:
    """A missing profile field renders as nothing, never as the word "None"."""
    return "" if value is None else value


_text_env = ImmutableSandboxedEnvironment(autoescape=False, undefined=Undefined, finalize=_finalize)
_html_env = ImmutableSandboxedEnvironment(autoescape=True, undefined=Undefined, finalize=_finalize)
for _env in (_text_env, _html_env):
    _env.policies["truncate.leeway"] = 0


class RenderError(Exception):
    """A template failed to compile or render; the message says where."""


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
                rendered[field_name] = compiled.render(context)
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
