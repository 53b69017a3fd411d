"""The delivery life cycle: every decision the engine records, without I/O."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finstream.domain.delivery import RetryPolicy
from finstream.domain.delivery.errors import DeliveryError, Feedback
from finstream.domain.delivery.lifecycle import (
    ALLOWED,
    FINAL_STATES,
    REOPENABLE_STATES,
    Accepted,
    Attempted,
    Delivered,
    Failed,
    IllegalMove,
    LookupFailed,
    NoProvider,
    NotAsked,
    NotFound,
    Outcome,
    Policy,
    Ready,
    Reconcile,
    Redelivery,
    State,
    Step,
    Then,
    Transition,
    Unavailable,
    Undeliverable,
    Unreadable,
    on_redelivery,
    redriven_deadline,
    settle,
)
from finstream.domain.resilience import Backoff, ErrorClass

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
POLICY = Policy(
    retry=RetryPolicy(max_attempts=4, backoff=Backoff(base=1.0, cap=30.0), max_age=3600.0),
    reconcile_delay=5.0,
)


@dataclass
class Row:
    state: str = State.QUEUED
    attempts: int = 0
    rounds: int = 0
    provider: str | None = None
    deadline: datetime = NOW + timedelta(hours=1)
    last_error_class: str | None = None
    last_error: str | None = None


def sending(**kw: object) -> Row:
    return replace(Row(state=State.SENDING, attempts=1, provider="sendgrid"), **kw)  # type: ignore[arg-type]


def err(cls: ErrorClass = ErrorClass.TRANSIENT, **kw: object) -> DeliveryError:
    return DeliveryError(cls, "boom", provider="sendgrid", **kw)  # type: ignore[arg-type]


def moved(step: Step) -> Transition:
    assert step.transition is not None
    return step.transition


def failed(
    error: DeliveryError, *, others: bool = False, mode: Reconcile = Reconcile.NONE
) -> Failed:
    return Failed("sendgrid", error, mode, others, 0.0)


# -- examples -------------------------------------------------------------------------


def test_an_accepted_send_is_sent_or_delivered() -> None:
    step = settle(sending(), Accepted("sendgrid", "SENT", "pm-1", "ok"), POLICY, now=NOW)
    assert step.transition is not None
    assert (step.transition.state, step.transition.provider_message_id) == ("sent", "pm-1")
    assert step.records == (Delivered("sendgrid", "SENT", "pm-1", "ok", ""),)
    inbox = settle(sending(), Accepted("inapp", "DELIVERED", None), POLICY, now=NOW)
    assert moved(inbox).state == "delivered"
    assert inbox.final
    assert inbox.reconciled is None


def test_a_transient_failure_fails_over_at_once_while_providers_remain() -> None:
    step = settle(sending(), failed(err(), others=True), POLICY, now=NOW)
    assert step.then is Then.SEND
    assert step.transition is not None
    assert moved(step).state == "queued"
    assert moved(step).keep_claim
    assert step.records == (Attempted("sendgrid", step.records[0].error),)  # type: ignore[union-attr]


def test_the_last_provider_of_a_round_schedules_a_retry_with_backoff() -> None:
    error = err(ErrorClass.THROTTLED, retry_after=7.0)
    step = settle(sending(), failed(error), POLICY, now=NOW, rng=random.Random(1))
    t = step.transition
    assert t is not None
    assert t.state == "retry"
    assert t.add_round
    assert t.next_attempt_at is not None
    assert t.next_attempt_at >= NOW + timedelta(seconds=7)
    assert isinstance(step.records[0], Attempted)
    assert step.records[0].note == f"next try at {t.next_attempt_at.isoformat()}"


def test_a_message_level_error_is_rejected_without_failover() -> None:
    error = err(ErrorClass.INVALID_RECIPIENT, feedback=Feedback.TOKEN_INVALID)
    step = settle(sending(), failed(error, others=True), POLICY, now=NOW)
    assert moved(step).state == "rejected"
    (record,) = step.records
    assert isinstance(record, Undeliverable)
    assert (record.status, record.verdict, record.error) == ("REJECTED", "rejected", error)
    # Named for what it says about the recipient: the feedback role marks the token.
    assert record.error_class == moved(step).error_class == "token_invalid"


def test_an_ambiguous_answer_is_looked_up_later_when_the_provider_can_be_asked() -> None:
    step = settle(sending(), failed(err(ambiguous=True), mode=Reconcile.LOOKUP), POLICY, now=NOW)
    t = step.transition
    assert t is not None
    assert t.state == "unknown"
    assert t.error_class == "unknown_outcome"
    assert t.next_attempt_at == NOW + timedelta(seconds=5)


def test_an_ambiguous_answer_without_lookup_is_dead_lettered_or_resent_by_policy() -> None:
    dead = settle(sending(), failed(err(ambiguous=True)), POLICY, now=NOW)
    assert moved(dead).state == "failed"
    assert moved(dead).error_class == "unknown_outcome"
    resend = replace(POLICY, unknown_outcome="resend")
    again = settle(sending(), failed(err(ambiguous=True)), resend, now=NOW)
    assert moved(again).state == "retry"
    push = settle(
        sending(), failed(err(ambiguous=True), mode=Reconcile.IDEMPOTENT), POLICY, now=NOW
    )
    assert moved(push).state == "retry"


def test_ready_expires_past_the_deadline_and_gives_up_at_the_attempt_limit() -> None:
    late = settle(Row(deadline=NOW), Ready(), POLICY, now=NOW)
    assert moved(late).state == "expired"
    assert moved(late).error_class == "expired"
    spent = Row(attempts=4, last_error_class="throttled", last_error="slow down")
    out = settle(spent, Ready(), POLICY, now=NOW)
    assert moved(out).state == "failed"
    (record,) = out.records
    assert isinstance(record, Undeliverable)
    assert record.error.error_class is ErrorClass.THROTTLED
    assert record.verdict == "gave up after 4 attempts"
    assert settle(Row(), Ready(), POLICY, now=NOW).then is Then.SEND


def test_every_provider_closed_defers_without_a_round_or_expires() -> None:
    step = settle(Row(), Unavailable(2.0), POLICY, now=NOW, rng=random.Random(3))
    t = step.transition
    assert step.deferred
    assert t is not None
    assert t.state == "retry"
    assert not t.add_round
    assert t.next_attempt_at is not None
    assert t.next_attempt_at >= NOW + timedelta(seconds=2)
    gone = settle(Row(deadline=NOW + timedelta(seconds=1)), Unavailable(60.0), POLICY, now=NOW)
    assert moved(gone).state == "expired"
    after_failover = settle(Row(attempts=1), Unavailable(1.0, err()), POLICY, now=NOW)
    assert moved(after_failover).add_round
    assert after_failover.records == ()  # no call of its own to record


def test_reconciliation_outcomes() -> None:
    unknown = Row(state=State.UNKNOWN, attempts=1, provider="sendgrid", last_error="timeout")
    assert settle(unknown, NotFound(), POLICY, now=NOW).then is Then.REQUEUE
    found = settle(
        unknown, Accepted("sendgrid", "SENT", "pm", None, how="reconciled: found"), POLICY, now=NOW
    )
    assert moved(found).state == "sent"
    assert found.reconciled == "found"
    again = settle(unknown, LookupFailed(err(retry_after=30.0)), POLICY, now=NOW)
    assert moved(again).state == "unknown"
    assert moved(again).next_attempt_at == NOW + timedelta(seconds=30)
    refused = settle(unknown, LookupFailed(err(ErrorClass.AUTH)), POLICY, now=NOW)
    assert moved(refused).state == "failed"
    assert refused.reconciled == "unknown"
    resent = settle(unknown, NotAsked(Reconcile.IDEMPOTENT), POLICY, now=NOW)
    assert (resent.then, resent.reconciled) == (Then.REQUEUE, "resent")


def test_unreadable_and_unroutable_messages_end_at_once() -> None:
    bad = settle(Row(), Unreadable("not avro"), POLICY, now=NOW)
    assert moved(bad).state == "failed"
    none = settle(Row(), NoProvider("no push provider"), POLICY, now=NOW)
    assert moved(none).state == "rejected"


def test_a_message_seen_again() -> None:
    assert {on_redelivery(s) for s in FINAL_STATES} == {Redelivery.DUPLICATE}
    assert on_redelivery("redrive") is Redelivery.REOPEN
    assert on_redelivery("retry") is Redelivery.IN_PROGRESS
    old = NOW - timedelta(days=3)
    assert redriven_deadline(old, NOW, POLICY.retry) == NOW + timedelta(hours=1)
    assert FINAL_STATES - {State.SENT, State.DELIVERED} == REOPENABLE_STATES


# -- properties -----------------------------------------------------------------------

errors = st.builds(
    DeliveryError,
    st.sampled_from(list(ErrorClass)),
    st.just("x"),
    provider=st.just("p"),
    retry_after=st.none() | st.floats(0, 600),
    ambiguous=st.booleans(),
)
modes = st.sampled_from(list(Reconcile))
outcomes: st.SearchStrategy[Outcome] = st.one_of(
    st.builds(Ready, st.none() | errors),
    st.builds(NoProvider, st.just("none")),
    st.builds(Unreadable, st.just("bad")),
    st.builds(Unavailable, st.floats(0, 7200), st.none() | errors),
    st.builds(
        Accepted,
        st.just("p"),
        st.sampled_from(["SENT", "DELIVERED"]),
        st.none() | st.just("pm"),
        how=st.sampled_from(["", "reconciled: found"]),
    ),
    st.builds(Failed, st.just("p"), errors, modes, st.booleans(), st.floats(0, 600)),
    st.builds(LookupFailed, errors),
    st.just(NotFound()),
    st.builds(NotAsked, modes),
)
rows = st.builds(
    Row,
    attempts=st.integers(0, 8),
    rounds=st.integers(0, 8),
    provider=st.none() | st.just("p"),
    deadline=st.integers(-60, 86400).map(lambda s: NOW + timedelta(seconds=s)),
)
policies = st.builds(
    Policy,
    retry=st.builds(RetryPolicy, max_attempts=st.integers(1, 8)),
    reconcile_delay=st.floats(0, 60),
    unknown_outcome=st.sampled_from(["deadletter", "resend"]),
)


@given(st.sampled_from(sorted(FINAL_STATES)), outcomes)
def test_no_path_leads_out_of_a_final_state(state: State, outcome: Outcome) -> None:
    with pytest.raises(IllegalMove):
        settle(Row(state=state), outcome, POLICY, now=NOW)
    assert not ALLOWED[state] - {State.REDRIVE}


# The state the engine holds a row in when each outcome is reported.
HELD_IN: dict[type, tuple[State, ...]] = {
    Ready: (State.QUEUED,),
    NoProvider: (State.QUEUED,),
    Unreadable: (State.QUEUED, State.UNKNOWN),
    Unavailable: (State.QUEUED,),
    Accepted: (State.SENDING, State.UNKNOWN),
    Failed: (State.SENDING,),
    LookupFailed: (State.UNKNOWN,),
    NotFound: (State.UNKNOWN,),
    NotAsked: (State.UNKNOWN,),
}


@settings(max_examples=300)
@given(rows, outcomes, policies, st.randoms(use_true_random=False), st.data())
def test_every_step_is_a_move_of_the_life_cycle(
    row: Row, outcome: Outcome, policy: Policy, rng: random.Random, data: st.DataObject
) -> None:
    row = replace(row, state=data.draw(st.sampled_from(HELD_IN[type(outcome)])))
    step = settle(row, outcome, policy, now=NOW, rng=rng)
    if step.transition is not None:
        assert moved(step).state in ALLOWED[State(row.state)]
        if moved(step).state in (State.RETRY, State.UNKNOWN):
            at = moved(step).next_attempt_at
            assert at is not None
            assert at <= row.deadline
    if step.final:
        assert len(step.records) == 1
        assert isinstance(step.records[0], Delivered | Undeliverable)


@settings(max_examples=300)
@given(rows, errors, modes, st.booleans(), policies)
def test_never_a_second_send_after_an_unknown_outcome(
    row: Row, error: DeliveryError, mode: Reconcile, others: bool, policy: Policy
) -> None:
    error.ambiguous = True
    step = settle(
        replace(row, state=State.SENDING), Failed("p", error, mode, others, 0.0), policy, now=NOW
    )
    assert step.then is not Then.SEND  # never the next provider in the same round
    assert step.transition is not None
    if step.transition.state == State.RETRY:  # only where a resend cannot show twice
        assert mode is Reconcile.IDEMPOTENT or policy.unknown_outcome == "resend"


@settings(max_examples=300)
@given(rows, outcomes.filter(lambda o: State.UNKNOWN in HELD_IN[type(o)]), policies)
def test_an_unknown_row_is_requeued_only_when_reconciled(
    row: Row, outcome: Outcome, policy: Policy
) -> None:
    unknown = replace(row, state=State.UNKNOWN)
    step = settle(unknown, outcome, policy, now=NOW, rng=random.Random(0))
    if step.then is Then.REQUEUE:
        assert isinstance(outcome, NotFound | NotAsked | LookupFailed)
        if isinstance(outcome, NotAsked | LookupFailed):
            resend_ok = policy.unknown_outcome == "resend"
            assert resend_ok or (
                isinstance(outcome, NotAsked) and outcome.reconcile is Reconcile.IDEMPOTENT
            )


@settings(max_examples=200)
@given(
    st.lists(st.tuples(errors, st.booleans()), min_size=1, max_size=40),
    st.integers(1, 8),
    st.randoms(use_true_random=False),
)
def test_retries_are_bounded_by_the_attempt_limit(
    failures: list[tuple[DeliveryError, bool]], max_attempts: int, rng: random.Random
) -> None:
    """Drive a row through failures only: it ends, after at most max_attempts calls."""
    policy = Policy(retry=RetryPolicy(max_attempts=max_attempts), reconcile_delay=1.0)
    row, now, calls = Row(deadline=NOW + timedelta(days=30)), NOW, 0
    for error, others in failures * 10:
        error.ambiguous = False
        step = settle(row, Ready(), policy, now=now, rng=rng)
        if step.then is not Then.SEND:
            break
        calls += 1
        row = replace(row, state=State.SENDING, attempts=row.attempts + 1)
        step = settle(
            row, Failed("p", error, Reconcile.NONE, others, 0.0), policy, now=now, rng=rng
        )
        assert step.transition is not None
        if step.final:
            break
        row = replace(row, state=State.QUEUED)
        if step.transition.state == State.RETRY:
            assert moved(step).next_attempt_at is not None
            now = step.transition.next_attempt_at
            row = replace(row, rounds=row.rounds + 1)
    assert calls <= max_attempts
