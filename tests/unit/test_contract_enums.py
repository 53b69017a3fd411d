"""One list per enumeration: the Avro schemas (the public contract), the domain and the API agree.

The domain's tuples are checked against the ``.avsc`` enums here; the API's
request and response models build their literal types from the domain's
tuples (finstream.api.models), so the OpenAPI document cannot drift either.
"""

from __future__ import annotations

import json
import typing
from typing import Any

import pytest

from finstream.api import models
from finstream.domain.alerts.rules import CONDITIONS, FREQUENCIES
from finstream.domain.notify.preferences import CHANNELS, PUSH_PLATFORMS
from finstream.domain.notify.request import PRIORITIES
from finstream.resources import resource


def _enum(schema: str, name: str) -> list[str]:
    found: list[list[str]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "enum" and node.get("name") == name:
                found.append(list(node["symbols"]))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads((resource("schemas") / f"{schema}.avsc").read_text()))
    assert found, f"{schema}.avsc has no enum {name}"
    return found[0]


@pytest.mark.parametrize(
    ("schema", "enum", "domain"),
    [
        ("AlertRule", "AlertCondition", CONDITIONS),
        ("AlertRule", "AlertFrequency", FREQUENCIES),
        ("NotificationRequest", "Priority", PRIORITIES),
        ("NotificationRequest", "Channel", tuple(c.upper() for c in CHANNELS)),
        ("OutboundMessage", "OutboundChannel", tuple(c.upper() for c in CHANNELS)),
        ("UserPreferences", "PushPlatform", PUSH_PLATFORMS),
    ],
)
def test_domain_enumerations_are_the_schemas_enums(
    schema: str, enum: str, domain: tuple[str, ...]
) -> None:
    assert list(domain) == _enum(schema, enum)


@pytest.mark.parametrize(
    ("literal", "domain"),
    [
        ("Condition", CONDITIONS),
        ("Frequency", FREQUENCIES),
        ("Channel", CHANNELS),
        ("RequestChannel", tuple(c.upper() for c in CHANNELS)),
        ("PushPlatform", PUSH_PLATFORMS),
        ("Priority", PRIORITIES),
    ],
)
def test_api_literals_are_the_domains(literal: str, domain: tuple[str, ...]) -> None:
    assert typing.get_args(getattr(models, literal)) == domain
