"""The failover chain state machine, driven by hand with a fake clock."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finstream.domain.marketdata.failover import FailoverChain, Outcome, ProviderGate
from finstream.domain.marketdata.normalize import LOCAL_RATE_LIMIT, STREAM_NOT_READY, LimitSpec
from finstream.domain.resilience import CircuitState, ErrorClass, ProviderError

SYMS = ("AAPL", "MSFT", "IBM")


def gates(*names: str, limits: list[LimitSpec] | None = None) -> dict[str, ProviderGate]:
    return {
        n: ProviderGate.build(n, limits or [], failure_threshold=3, reset_timeout=10) for n in names
    }


def err(
    cls: ErrorClass, retry_after: float | None = None, code: str | None = None
) -> ProviderError:
    return ProviderError(cls, "x", provider="p", retry_after=retry_after, code=code)


Behaviour = Callable[[str, tuple[str, ...]], Outcome]


def ok(_: str, symbols: tuple[str, ...]) -> Outcome:
    return Outcome(served=set(symbols))


def run_cycle(
    chain: FailoverChain, now: float, behave: dict[str, Behaviour]
) -> tuple[dict[str, str], list[str]]:
    cycle = chain.start_cycle(SYMS)
    asked = []
    while (attempt := chain.next_attempt(cycle, now)) is not None:
        asked.append(attempt.provider)
        chain.record(
            cycle, attempt, behave[attempt.provider](attempt.provider, attempt.symbols), now
        )
    transitions = chain.finish(cycle, now)
    chain.last_transitions = transitions  # type: ignore[attr-defined]
    return dict(cycle.served), asked


def test_the_primary_serves_when_healthy() -> None:
    chain = FailoverChain("c", ["a", "b"], gates("a", "b"))
    served, asked = run_cycle(chain, 0, {"a": ok, "b": ok})
    assert served == dict.fromkeys(SYMS, "a")
    assert asked == ["a"]
    assert chain.active == "a"
    assert chain.last_transitions == []  # type: ignore[attr-defined]


def test_a_throttled_primary_is_replaced_in_the_same_cycle_then_fails_back() -> None:
    g = gates("a", "b")
    chain = FailoverChain("c", ["a", "b"], g, throttle_pause=5)
    throttled = lambda *_: Outcome(error=err(ErrorClass.THROTTLED))  # noqa: E731
    run_cycle(chain, 0, {"a": ok, "b": ok})
    served, asked = run_cycle(chain, 1, {"a": throttled, "b": ok})
    assert served == dict.fromkeys(SYMS, "b")
    assert asked == ["a", "b"]
    [t] = chain.last_transitions  # type: ignore[attr-defined]
    assert (t.kind, t.from_provider, t.to_provider) == ("failover", "a", "b")
    # The pause (no Retry-After: the configured 5 s) keeps the primary out without asking it.
    served, asked = run_cycle(chain, 3, {"a": ok, "b": ok})
    assert asked == ["b"]
    # After the pause the primary is asked first again and takes over.
    served, asked = run_cycle(chain, 6.5, {"a": ok, "b": ok})
    assert asked == ["a"]
    [t] = chain.last_transitions  # type: ignore[attr-defined]
    assert (t.kind, t.from_provider, t.to_provider) == ("failback", "b", "a")


def test_retry_after_sets_the_pause() -> None:
    g = gates("a", "b")
    chain = FailoverChain("c", ["a", "b"], g, throttle_pause=60)
    run_cycle(
        chain, 0, {"a": lambda *_: Outcome(error=err(ErrorClass.THROTTLED, retry_after=2)), "b": ok}
    )
    assert g["a"].wait_time(1) == pytest.approx(1)
    _, asked = run_cycle(chain, 2.5, {"a": ok, "b": ok})
    assert asked == ["a"]


def test_repeated_failures_open_the_circuit_and_a_probe_closes_it() -> None:
    g = gates("a", "b")
    chain = FailoverChain("c", ["a", "b"], g)
    down = lambda *_: Outcome(error=err(ErrorClass.TRANSIENT))  # noqa: E731
    for now in (0, 1, 2):
        _, asked = run_cycle(chain, now, {"a": down, "b": ok})
        assert asked == ["a", "b"]
    assert g["a"].circuit(2) is CircuitState.OPEN
    _, asked = run_cycle(chain, 5, {"a": down, "b": ok})
    assert asked == ["b"]  # open: not asked at all
    # After the cool-down one probe goes through; it fails, the circuit reopens.
    _, asked = run_cycle(chain, 12.5, {"a": down, "b": ok})
    assert asked == ["a", "b"]
    assert g["a"].circuit(12.5) is CircuitState.OPEN
    _, asked = run_cycle(chain, 23, {"a": ok, "b": ok})
    assert asked == ["a"]
    assert g["a"].circuit(23) is CircuitState.CLOSED
    assert chain.active == "a"


def test_auth_and_permanent_errors_count_against_the_provider() -> None:
    for cls in (ErrorClass.AUTH, ErrorClass.PERMANENT, ErrorClass.MALFORMED):
        g = gates("a", "b")
        chain = FailoverChain("c", ["a", "b"], g)
        for now in range(3):
            run_cycle(chain, now, {"a": lambda *_, c=cls: Outcome(error=err(c)), "b": ok})
        assert g["a"].circuit(3) is CircuitState.OPEN, cls


def test_our_own_rate_limit_and_connecting_streams_do_not_open_circuits() -> None:
    for code in (LOCAL_RATE_LIMIT, STREAM_NOT_READY):
        g = gates("a", "b")
        chain = FailoverChain("c", ["a", "b"], g)
        for now in range(5):
            run_cycle(
                chain,
                now,
                {"a": lambda *_, c=code: Outcome(error=err(ErrorClass.THROTTLED, code=c)), "b": ok},
            )
        assert g["a"].circuit(5) is CircuitState.CLOSED
        assert g["a"].wait_time(5) == 0


def test_rate_limits_skip_a_provider_instead_of_waiting() -> None:
    g = gates("a", "b", limits=[LimitSpec(1, 10)])  # 1 request per 10 s
    chain = FailoverChain("c", ["a", "b"], g, max_wait=0.5)
    g["a"].try_acquire(0)
    served, asked = run_cycle(chain, 1, {"a": ok, "b": ok})
    assert asked == ["b"]
    assert served == dict.fromkeys(SYMS, "b")


def test_partial_results_leave_the_rest_to_the_next_provider() -> None:
    chain = FailoverChain("c", ["a", "b"], gates("a", "b"))

    def partial(_: str, symbols: tuple[str, ...]) -> Outcome:
        return Outcome(served={"AAPL"}, error=err(ErrorClass.THROTTLED))

    served, _ = run_cycle(chain, 0, {"a": partial, "b": ok})
    assert served == {"AAPL": "a", "MSFT": "b", "IBM": "b"}
    assert chain.active == "a"
    assert chain.assignment == served


def test_unknown_symbols_go_to_the_next_provider_and_are_not_asked_again_soon() -> None:
    g = gates("a", "b")
    chain = FailoverChain("c", ["a", "b"], g, unknown_retry=100)
    seen: list[tuple[str, ...]] = []

    def a(_: str, symbols: tuple[str, ...]) -> Outcome:
        seen.append(symbols)
        return Outcome(served=set(symbols) - {"IBM"}, unknown={"IBM"} & set(symbols))

    served, _ = run_cycle(chain, 0, {"a": a, "b": ok})
    assert served["IBM"] == "b"
    run_cycle(chain, 1, {"a": a, "b": ok})
    assert seen[-1] == ("AAPL", "MSFT")
    assert g["a"].circuit(1) is CircuitState.CLOSED  # not knowing a symbol is not a failure
    run_cycle(chain, 101, {"a": a, "b": ok})
    assert seen[-1] == SYMS


def test_symbol_errors_only_fail_the_provider_when_every_symbol_failed() -> None:
    g = gates("a", "b")
    chain = FailoverChain("c", ["a", "b"], g)
    zero = err(ErrorClass.MALFORMED, code="zero_filled")

    def one_bad(_: str, symbols: tuple[str, ...]) -> Outcome:
        return Outcome(served=set(symbols) - {"IBM"}, symbol_errors={"IBM": zero})

    def all_bad(_: str, symbols: tuple[str, ...]) -> Outcome:
        return Outcome(symbol_errors=dict.fromkeys(symbols, zero))

    for now in range(4):
        served, _ = run_cycle(chain, now, {"a": one_bad, "b": ok})
    assert served["IBM"] == "b"
    assert g["a"].circuit(4) is CircuitState.CLOSED
    for now in range(4, 7):
        run_cycle(chain, now, {"a": all_bad, "b": ok})
    assert g["a"].circuit(7) is CircuitState.OPEN


def test_outage_and_recovery() -> None:
    chain = FailoverChain("c", ["a"], gates("a"))
    run_cycle(chain, 0, {"a": ok})
    run_cycle(chain, 1, {"a": lambda *_: Outcome(error=err(ErrorClass.TRANSIENT))})
    [t] = chain.last_transitions  # type: ignore[attr-defined]
    assert (t.kind, t.to_provider) == ("outage", None)
    assert chain.assignment == {}
    assert chain.needed() == ("a",)
    run_cycle(chain, 2, {"a": ok})
    [t] = chain.last_transitions  # type: ignore[attr-defined]
    assert t.kind == "recovered"


def test_needed_covers_the_active_provider_and_those_above() -> None:
    chain = FailoverChain("c", ["a", "b", "c"], gates("a", "b", "c"))
    assert chain.needed() == ("a", "b", "c")
    run_cycle(
        chain, 0, {"a": lambda *_: Outcome(error=err(ErrorClass.TRANSIENT)), "b": ok, "c": ok}
    )
    assert chain.needed() == ("a", "b")


def test_bad_chains_are_refused() -> None:
    with pytest.raises(ValueError, match="no providers"):
        FailoverChain("c", [], gates("a"))
    with pytest.raises(ValueError, match="twice"):
        FailoverChain("c", ["a", "a"], gates("a"))
    with pytest.raises(ValueError, match="no gate"):
        FailoverChain("c", ["a", "z"], gates("a"))


outcomes = st.sampled_from(
    ["ok", "throttled", "transient", "auth", "unknown", "partial", "malformed"]
)


@settings(max_examples=200)
@given(st.lists(st.tuples(outcomes, outcomes, outcomes), min_size=1, max_size=40))
def test_every_symbol_is_served_by_at_most_one_provider_per_cycle(
    script: list[tuple[str, str, str]],
) -> None:
    g = gates("a", "b", "c")
    chain = FailoverChain("c", ["a", "b", "c"], g, throttle_pause=2)

    def behaviour(kind: str) -> Behaviour:
        def f(_: str, symbols: tuple[str, ...]) -> Outcome:
            return {
                "ok": lambda: Outcome(served=set(symbols)),
                "throttled": lambda: Outcome(error=err(ErrorClass.THROTTLED)),
                "transient": lambda: Outcome(error=err(ErrorClass.TRANSIENT)),
                "auth": lambda: Outcome(error=err(ErrorClass.AUTH)),
                "unknown": lambda: Outcome(unknown=set(symbols)),
                "partial": lambda: Outcome(
                    served=set(symbols[:1]), error=err(ErrorClass.TRANSIENT)
                ),
                "malformed": lambda: Outcome(
                    symbol_errors=dict.fromkeys(symbols, err(ErrorClass.MALFORMED))
                ),
            }[kind]()

        return f

    for now, kinds in enumerate(script):
        cycle = chain.start_cycle(SYMS)
        asked: list[str] = []
        while (attempt := chain.next_attempt(cycle, float(now))) is not None:
            assert attempt.provider not in asked  # each provider at most once per cycle
            asked.append(attempt.provider)
            assert set(attempt.symbols) <= set(cycle.pending)
            behave = behaviour(kinds["abc".index(attempt.provider)])
            chain.record(cycle, attempt, behave(attempt.provider, attempt.symbols), float(now))
        chain.finish(cycle, float(now))
        assert set(cycle.served) | set(cycle.pending) == set(SYMS)
        assert not set(cycle.served) & set(cycle.pending)
        assert chain.assignment == cycle.served
        if cycle.served:
            assert chain.active == min(cycle.served.values(), key="abc".index)
        else:
            assert chain.active is None


# -- half-open probes always settle (issue 12: permanent lock-out) -----------------------


def open_circuit(chain: FailoverChain, behave: dict[str, Behaviour]) -> float:
    """Three failing cycles of "a" (threshold 3); returns the time the cool-down (10 s) ends."""
    down = lambda *_: Outcome(error=err(ErrorClass.TRANSIENT))  # noqa: E731
    for now in (0, 1, 2):
        run_cycle(chain, now, {**behave, "a": down})
    assert chain.gates["a"].circuit(2) is CircuitState.OPEN
    return 12.0


def test_a_probe_that_serves_some_symbols_then_hits_our_own_limit_closes_the_circuit() -> None:
    g = gates("a", "b")
    chain = FailoverChain("c", ["a", "b"], g)
    t = open_circuit(chain, {"b": ok})

    def served_two_then_local_limit(_: str, symbols: tuple[str, ...]) -> Outcome:
        local = err(ErrorClass.THROTTLED, retry_after=12, code=LOCAL_RATE_LIMIT)
        return Outcome(served=set(symbols[:2]), error=local)

    served, asked = run_cycle(chain, t, {"a": served_two_then_local_limit, "b": ok})
    assert asked == ["a", "b"]
    assert served == {"AAPL": "a", "MSFT": "a", "IBM": "b"}
    # It answered with data: closed, and asked first again from the next cycle on.
    assert g["a"].circuit(t) is CircuitState.CLOSED
    _, asked = run_cycle(chain, t + 1, {"a": ok, "b": ok})
    assert asked == ["a"]
    assert chain.active == "a"


def test_a_probe_that_never_reached_the_provider_is_handed_back() -> None:
    for code in (LOCAL_RATE_LIMIT, STREAM_NOT_READY):
        g = gates("a", "b")
        chain = FailoverChain("c", ["a", "b"], g)
        t = open_circuit(chain, {"b": ok})
        not_asked = lambda *_, c=code: Outcome(error=err(ErrorClass.THROTTLED, code=c))  # noqa: E731
        _, asked = run_cycle(chain, t, {"a": not_asked, "b": ok})
        assert asked == ["a", "b"]
        assert g["a"].circuit(t) is CircuitState.HALF_OPEN
        # The next cycle probes again (the probe was not spent), and the probe closes it.
        _, asked = run_cycle(chain, t + 1, {"a": ok, "b": ok})
        assert asked == ["a"], code
        assert g["a"].circuit(t + 1) is CircuitState.CLOSED


def test_a_probe_never_reported_is_written_off_after_the_cool_down() -> None:
    g = gates("a", "b")
    chain = FailoverChain("c", ["a", "b"], g)
    t = open_circuit(chain, {"b": ok})
    cycle = chain.start_cycle(SYMS)
    attempt = chain.next_attempt(cycle, t)
    assert attempt is not None
    assert attempt.provider == "a"  # the probe; whoever took it never says how it went
    _, asked = run_cycle(chain, t + 1, {"a": ok, "b": ok})
    assert asked == ["b"]  # one probe at a time
    _, asked = run_cycle(chain, t + 10, {"a": ok, "b": ok})
    assert asked == ["a"]
    assert g["a"].circuit(t + 10) is CircuitState.CLOSED


@settings(max_examples=300)
@given(
    st.lists(
        st.sampled_from(["ok", "partial_local", "local", "not_ready", "transient", "throttled"]),
        min_size=1,
        max_size=60,
    )
)
def test_a_healthy_provider_is_never_locked_out(script: list[str]) -> None:
    """Whatever happened before, once the provider answers again it serves within
    one cool-down plus one cycle (here: 10 s cool-down, a cycle a second)."""
    g = gates("a", "b")
    chain = FailoverChain("c", ["a", "b"], g, throttle_pause=5)
    local = err(ErrorClass.THROTTLED, retry_after=0.5, code=LOCAL_RATE_LIMIT)
    kinds: dict[str, Behaviour] = {
        "ok": ok,
        "partial_local": lambda _, s: Outcome(served=set(s[:1]), error=local),
        "local": lambda *_: Outcome(error=local),
        "not_ready": lambda *_: Outcome(error=err(ErrorClass.TRANSIENT, code=STREAM_NOT_READY)),
        "transient": lambda *_: Outcome(error=err(ErrorClass.TRANSIENT)),
        "throttled": lambda *_: Outcome(error=err(ErrorClass.THROTTLED)),
    }
    now = 0.0
    for kind in script:
        run_cycle(chain, now, {"a": kinds[kind], "b": ok})
        now += 1
    deadline = now + 10 + 5 + 1  # cool-down, the longest pause, one cycle
    while now <= deadline:
        served, _ = run_cycle(chain, now, {"a": ok, "b": ok})
        if set(served.values()) == {"a"}:
            break
        now += 1
    assert chain.active == "a", f"still locked out at {now} after {script}"
