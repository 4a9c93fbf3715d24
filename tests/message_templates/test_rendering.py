"""Dict lookups in the sandbox: keys first, missing keys undefined, dict methods still there."""

from __future__ import annotations

import pytest
from jinja2 import UndefinedError
from jinja2.exceptions import SecurityError

from whistle_web.message_templates.rendering import _html_env, _text_env

CONTEXT = {"recipient": {"name": None, "attributes": {"plan": "pro", "items": "a key"}}}


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("{{ recipient.attributes.plan }}", "pro"),
        ("{{ recipient.attributes.tier | default('free') }}", "free"),
        ("[{{ recipient.attributes.tier }}]", "[]"),
        ("{% if recipient.attributes.tier %}yes{% else %}no{% endif %}", "no"),
        ("{{ recipient.attributes.items }}", "a key"),  # the data wins over the method
        ("{{ recipient.attributes.keys() | sort | join(',') }}", "items,plan"),
        ("{{ recipient.name or 'there' }}", "there"),
    ],
)
def test_dict_lookups(source, expected):
    assert _text_env.from_string(source).render(CONTEXT) == expected
    assert _html_env.from_string(source).render(CONTEXT) == expected


def test_a_missing_key_cannot_be_walked_through():
    with pytest.raises(UndefinedError, match="has no attribute 'tier'"):
        _text_env.from_string("{{ recipient.attributes.tier.level }}").render(CONTEXT)


def test_unsafe_attributes_stay_out_of_reach():
    assert _text_env.from_string("{{ recipient.attributes.__class__ }}").render(CONTEXT) == ""
    with pytest.raises(SecurityError):
        _text_env.from_string("{{ recipient.attributes.__class__.__mro__ }}").render(CONTEXT)
