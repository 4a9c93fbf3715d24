"""A template is staff input: a slow or huge field fails with a message, it never hangs."""

from __future__ import annotations

import time

import pytest

from whistle_web.message_templates import rendering
from whistle_web.message_templates.rendering import RenderError, compile_content


def render(source: str, **context: object) -> str:
    return compile_content({"email": {"text": source}}).render("email", dict(context))["text"]


def test_ordinary_templates_render() -> None:
    assert render("{% for i in range(3) %}{{ i }}{% endfor %} {{ data.x }}", data={"x": 1}) == (
        "012 1"
    )


def test_a_huge_range_is_refused() -> None:
    with pytest.raises(RenderError, match="range\\(\\) is limited to 10,000 items"):
        render("{% for i in range(10001) %}{% endfor %}")


def test_nested_loops_stop_at_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rendering, "RENDER_SECONDS", 0.2)
    started = time.monotonic()
    # 10^12 iterations that print nothing: only the clock inside range() can stop them.
    source = (
        "{% for a in range(10000) %}{% for b in range(10000) %}"
        "{% for c in range(10000) %}{% endfor %}{% endfor %}{% endfor %}"
    )
    with pytest.raises(RenderError, match=r"rendering took longer than 0\.2 s"):
        render(source)
    assert time.monotonic() - started < 2


def test_output_size_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rendering, "MAX_OUTPUT_CHARS", 1000)
    with pytest.raises(RenderError, match="output is larger than 1,000 characters"):
        render("{% for i in range(100) %}{{ data.text }}{% endfor %}", data={"text": "x" * 20})
    assert len(render("{{ data.text }}", data={"text": "x" * 1000})) == 1000


def test_dict_keys_read_as_attributes_and_the_sandbox_still_holds() -> None:
    attributes = {"plan": "pro", "items": "three"}
    assert render("{{ a.plan }} {{ a.items }} {{ a.missing }}!", a=attributes) == "pro three !"
    # Methods of a dict stay reachable when no key shadows them; internals stay closed.
    assert render("{{ a.keys() | list | length }}", a={"x": 1}) == "1"
    with pytest.raises(RenderError):
        render("{{ a.__class__.__mro__ }}", a={"x": 1})
