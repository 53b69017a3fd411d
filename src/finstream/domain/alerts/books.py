"""Rule books: one symbol's rules, compiled and indexed for evaluation.

:mod:`finstream.domain.alerts.engine` evaluates ticks against a book; the
book is rebuilt only when the symbol's rules change.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal

from finstream.domain.alerts.conditions import (
    BAND_CONDITIONS,
    HUNDRED,
    LEVEL_EDGE_CONDITIONS,
    Check,
    check_of,
)
from finstream.domain.alerts.rules import MOVING_CONDITIONS, AlertRule
from finstream.domain.marketdata.bars import Interval
from finstream.domain.time import to_micros


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """A rule with everything evaluation needs precomputed (times in micros)."""

    rule: AlertRule
    rule_id: str
    version: int  # updated_at
    created: int
    expires: int | None
    frequency: str
    cooldown: int
    check: Check

    @classmethod
    def of(cls, rule: AlertRule, interval: Interval) -> CompiledRule:
        return cls(
            rule=rule,
            rule_id=rule.rule_id,
            version=to_micros(rule.updated_at),
            created=to_micros(rule.created_at),
            expires=to_micros(rule.expires_at) if rule.expires_at is not None else None,
            frequency=rule.frequency,
            cooldown=(rule.cooldown_seconds or 0) * 1_000_000,
            check=check_of(rule),
        )


@dataclass(frozen=True)
class RuleBook:
    """One symbol's rules, prepared for evaluation.

    Crossing rules evaluated on ticks sit in an index sorted by level: a tick
    can only cross the levels between the previous price and its own, found
    by bisection, so a tick costs the same however many crossing levels a
    symbol has. The other rules are checked one by one with precompiled
    conditions. Firings come out ordered by rule id.
    """

    interval: Interval
    levels: tuple[Decimal, ...]  # sorted; levels[i] belongs to level_rules[i]
    level_rules: tuple[CompiledRule, ...]
    tick_rules: tuple[CompiledRule, ...]  # every other rule evaluated on ticks
    close_rules: tuple[CompiledRule, ...]
    history_needed: int
    versions: Mapping[str, int]  # rule id -> updated_at in micros
    # Rules whose condition depends on the price (and the previous price) alone:
    # greater/less than, and the four channel conditions. ``breaks`` are their
    # thresholds, sorted. Two prices at the same place among the breaks
    # (bisect left and right, so equality counts) satisfy the same of them; a
    # tick that stays where the previous one was needs no check: its state
    # conditions hold as before and no transition (entering, exiting) happened.
    band_rules: tuple[CompiledRule, ...] = ()
    breaks: tuple[Decimal, ...] = ()
    # For the quiet zone: whether every rule evaluated on ticks is of a kind it
    # covers, the moving rules' windows and fractions (percent / 100), the
    # smallest change-from-close fraction, the volume spikes' (bars,
    # multiplier), and how far around the price the moving rules allow it.
    zoned: bool = False
    moving_up: tuple[tuple[int | None, int | None, Decimal], ...] = ()
    moving_down: tuple[tuple[int | None, int | None, Decimal], ...] = ()
    change_fraction: Decimal | None = None
    spikes: tuple[tuple[int, Decimal], ...] = ()
    spread: Decimal | None = None

    @classmethod
    def build(
        cls,
        rules: Iterable[AlertRule],
        interval: Interval,
        *,
        band_index: bool = True,
        quiet_zone: bool = True,
    ) -> RuleBook:
        ordered = sorted(rules, key=lambda r: r.rule_id)
        need = 0
        for r in ordered:
            if r.condition == "VOLUME_SPIKE" and r.bars is not None:
                need = max(need, r.bars)
            elif r.condition in MOVING_CONDITIONS:
                if r.bars is not None:
                    need = max(need, r.bars - 1)
                elif r.window_seconds is not None:
                    need = max(need, -(-r.window_seconds // interval.seconds) + 1)
        compiled = [CompiledRule.of(r, interval) for r in ordered]
        close_rules = tuple(c for c in compiled if c.frequency == "ONCE_PER_BAR_CLOSE")
        if close_rules:
            need = max(need, 1)  # the previous bar's close is the previous price
        on_ticks = [c for c in compiled if c.frequency != "ONCE_PER_BAR_CLOSE"]
        indexed = sorted(
            (c for c in on_ticks if c.rule.condition in LEVEL_EDGE_CONDITIONS),
            key=lambda c: (c.rule.value, c.rule_id),
        )
        rest = [c for c in on_ticks if c.rule.condition not in LEVEL_EDGE_CONDITIONS]
        banded = tuple(c for c in rest if band_index and c.rule.condition in BAND_CONDITIONS)
        breaks: set[Decimal] = set()
        for c in banded:
            r = c.rule
            breaks.update(v for v in (r.value, r.lower, r.upper) if v is not None)
        tick_rules = tuple(c for c in rest if c not in banded)
        up: list[tuple[int | None, int | None, Decimal]] = []
        down: list[tuple[int | None, int | None, Decimal]] = []
        changes: list[Decimal] = []
        spikes: list[tuple[int, Decimal]] = []
        spreads: list[Decimal] = []
        zoned = quiet_zone
        for c in tick_rules:
            r, kind = c.rule, c.rule.condition
            fraction = r.percent / HUNDRED if r.percent is not None else None
            if kind == "MOVING_UP_PERCENT" and fraction is not None and fraction > 0:
                up.append((r.bars, r.window_seconds, fraction))
                spreads.append(fraction / (2 + fraction) / 2)
            elif kind == "MOVING_DOWN_PERCENT" and fraction is not None and 0 < fraction < 1:
                down.append((r.bars, r.window_seconds, fraction))
                spreads.append(fraction / (2 - fraction) / 2)
            elif kind == "CHANGE_FROM_PREV_CLOSE_PERCENT" and fraction is not None and fraction > 0:
                changes.append(fraction)
            elif kind == "VOLUME_SPIKE" and r.bars is not None and r.multiplier is not None:
                spikes.append((r.bars, r.multiplier))
            else:
                zoned = False  # a kind the zone does not cover: every tick is checked
        return cls(
            interval=interval,
            levels=tuple(c.rule.value for c in indexed if c.rule.value is not None),
            level_rules=tuple(indexed),
            tick_rules=tick_rules,
            close_rules=close_rules,
            history_needed=need,
            versions={c.rule_id: c.version for c in compiled},
            band_rules=banded,
            breaks=tuple(sorted(breaks)),
            zoned=zoned,
            moving_up=tuple(up),
            moving_down=tuple(down),
            change_fraction=min(changes) if changes else None,
            spikes=tuple(spikes),
            spread=min(spreads) if spreads else None,
        )

    @property
    def empty(self) -> bool:
        return (
            not self.level_rules
            and not self.tick_rules
            and not self.close_rules
            and not self.band_rules
        )
