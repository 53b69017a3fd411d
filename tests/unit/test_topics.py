"""topics.yaml parsing and the apply plan."""

from __future__ import annotations

import pytest

from finstream.topics import (
    CatalogueError,
    ExistingTopic,
    load_catalogue,
    parse_catalogue,
    plan,
)

DESIGN_TOPICS = {
    "md.ticks",
    "md.bars.1m",
    "alerts.rules",
    "alerts.fired",
    "notify.requests",
    "notify.preferences",
    "notify.outbound.email",
    "notify.outbound.push",
    "notify.outbound.sms",
    "notify.outbound.inapp",
    "notify.scheduled",
    "notify.delivery",
    "audit.events",
    "dlq",
}


def test_the_catalogue_lists_every_design_topic() -> None:
    catalogue = load_catalogue()
    assert set(catalogue.names) >= DESIGN_TOPICS


def test_state_topics_are_compacted_and_copartitioned() -> None:
    c = load_catalogue()
    assert c.get("alerts.rules").cleanup_policy == "compact"
    assert c.get("notify.preferences").cleanup_policy == "compact"
    by_user = {
        c.get(n).partitions for n in ("notify.requests", "notify.preferences", "notify.scheduled")
    }
    assert len(by_user) == 1, "user-keyed topics must be co-partitioned"


def _doc(entry: str) -> str:
    return f"topics:\n  - {entry}\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("topics: [", "not valid YAML"),
        ("- a\n- b\n", "mapping with a 'topics' list"),
        ("extra: 1\ntopics: []\n", "unknown top-level keys"),
        (
            _doc("name: x\n    partitions: 0\n    key: k\n    value_schema: raw"),
            r"entry #1 \(x\): partitions",
        ),
        (_doc("name: x\n    partitions: 3\n    key: k"), r"entry #1 \(x\): value_schema"),
        (
            _doc("name: x\n    partitions: 3\n    key: k\n    value_schema: raw\n    colour: red"),
            r"entry #1 \(x\): colour",
        ),
        (
            _doc("name: 'bad name'\n    partitions: 3\n    key: k\n    value_schema: raw"),
            r"entry #1 \(bad name\): name",
        ),
        (_doc("name: x\n    partitions: 3\n    key: k\n    value_schema: Nope"), "has no schemas"),
        (
            _doc(
                "name: x\n    partitions: 3\n    key: k\n    value_schema: raw\n    cleanup_policy: shred"
            ),
            "cleanup_policy",
        ),
        ("topics:\n  - 42\n", "entry #1: must be a mapping"),
        (
            "topics:\n  - {name: x, partitions: 1, key: k, value_schema: raw}\n"
            "  - {name: x, partitions: 1, key: k, value_schema: raw}\n",
            r"entry #2 \(x\): topic listed twice",
        ),
    ],
)
def test_malformed_catalogue_names_the_offending_entry(text: str, message: str) -> None:
    with pytest.raises(CatalogueError, match=message):
        parse_catalogue(text, schemas={"Tick"})


CAT = parse_catalogue(
    "defaults:\n  config: {min.insync.replicas: 1}\n"
    "topics:\n"
    "  - {name: a, partitions: 3, key: k, value_schema: raw, retention_ms: 1000}\n"
    "  - {name: b, partitions: 6, key: k, value_schema: raw, cleanup_policy: compact, retention_ms: -1}\n"
)


def _existing(partitions: int, **configs: str) -> ExistingTopic:
    base = {"min.insync.replicas": "1", "cleanup.policy": "delete", "retention.ms": "1000"}
    return ExistingTopic(partitions, 1, {**base, **configs})


def test_plan_creates_missing_topics_with_the_namespace() -> None:
    changes = plan(CAT, {}, namespace="ns.")
    assert [(c.kind, c.topic, c.partitions) for c in changes] == [
        ("create", "ns.a", 3),
        ("create", "ns.b", 6),
    ]
    assert changes[1].configs["cleanup.policy"] == "compact"


def test_plan_is_empty_when_the_cluster_matches() -> None:
    existing = {
        "a": _existing(3),
        "b": _existing(6, **{"cleanup.policy": "compact", "retention.ms": "-1"}),
    }
    assert plan(CAT, existing) == []


def test_plan_raises_partitions_and_updates_configs() -> None:
    existing = {
        "a": _existing(2, **{"retention.ms": "5"}),
        "b": _existing(6, **{"cleanup.policy": "compact", "retention.ms": "-1"}),
    }
    changes = plan(CAT, existing)
    assert [(c.kind, c.topic) for c in changes] == [("partitions", "a"), ("config", "a")]
    assert changes[0].partitions == 3
    assert changes[1].configs == {"retention.ms": "1000"}
    assert "retention.ms: 5 -> 1000" in changes[1].render()


def test_plan_refuses_to_decrease_partitions() -> None:
    existing = {
        "a": _existing(8),
        "b": _existing(6, **{"cleanup.policy": "compact", "retention.ms": "-1"}),
    }
    changes = plan(CAT, existing)
    assert [c.kind for c in changes] == ["refuse"]
    assert "cannot remove partitions" in changes[0].render()


def test_plan_warns_about_replication_it_cannot_change() -> None:
    existing = {
        "a": ExistingTopic(3, 3, _existing(3).configs),
        "b": _existing(6, **{"cleanup.policy": "compact", "retention.ms": "-1"}),
    }
    changes = plan(CAT, existing)
    assert [c.kind for c in changes] == ["warn"]


def test_min_insync_replicas_follows_the_replication_factor() -> None:
    cat = parse_catalogue("topics:\n  - {name: a, partitions: 3, key: k, value_schema: raw}\n")
    assert plan(cat, {})[0].configs["min.insync.replicas"] == "1"
    production = plan(cat, {}, replication_factor=3)[0]
    assert production.configs["min.insync.replicas"] == "2"
    existing = {
        "a": ExistingTopic(
            3,
            3,
            {"min.insync.replicas": "1", "cleanup.policy": "delete", "retention.ms": "604800000"},
        )
    }
    [change] = plan(cat, existing, replication_factor=3)
    assert change.kind == "config"
    assert change.configs == {"min.insync.replicas": "2"}
    explicit = parse_catalogue(
        "topics:\n  - {name: a, partitions: 3, key: k, value_schema: raw, config: {min.insync.replicas: 3}}\n"
    )
    assert plan(explicit, {}, replication_factor=5)[0].configs["min.insync.replicas"] == "3"
