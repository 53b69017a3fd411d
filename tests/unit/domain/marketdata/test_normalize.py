"""Normalization helpers: JSON with Decimals, prices, times, ids, statuses, secrets, limits."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from finstream.domain.marketdata.normalize import (
    EASTERN,
    classify_status,
    epoch_to_utc,
    load_json,
    local_to_utc,
    optional_positive,
    parse_limits,
    price,
    quote_id,
    scrub,
    scrub_url,
    trade_id,
    zone,
)
from finstream.domain.resilience import ErrorClass, ProviderError


def _cls(fn, *args) -> tuple[ErrorClass, str | None]:  # type: ignore[no-untyped-def]
    with pytest.raises(ProviderError) as info:
        fn(*args)
    return info.value.error_class, info.value.code


def test_json_numbers_are_decimals_never_floats() -> None:
    data = load_json(b'{"p": 187.43, "big": 0.1, "n": 7}', "x")
    assert data == {"p": Decimal("187.43"), "big": Decimal("0.1"), "n": 7}
    assert isinstance(data["p"], Decimal)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"", "empty"),
        (b"   \n", "empty"),
        (b"<!DOCTYPE html><html>Service Unavailable</html>", "html"),
        (b"\n  <html><body>502</body></html>", "html"),
        (b'{"Global Quote": {"01. symbol": "IB', "bad_json"),
        (b"Too Many Requests", "bad_json"),
        (b'{"c": NaN}', "bad_json"),
        (b'{"c": Infinity}', "bad_json"),
        (b"\xff\xfe{}", "encoding"),
        (b"{" * 100_000, "bad_json"),
    ],
)
def test_bodies_that_are_not_json_are_malformed(body: bytes, code: str) -> None:
    assert _cls(load_json, body, "x") == (ErrorClass.MALFORMED, code)


def test_truncated_json_says_truncated() -> None:
    with pytest.raises(ProviderError, match="truncated JSON"):
        load_json(b'{"a": [1, 2', "x")


def test_oversized_body_is_refused() -> None:
    assert _cls(load_json, b" " * (9 * 1024 * 1024), "x")[1] == "oversized"


@given(st.binary(max_size=300))
def test_any_bytes_parse_or_raise_a_malformed_error(body: bytes) -> None:
    error: ProviderError | None = None
    try:
        load_json(body, "x")
    except ProviderError as exc:
        error = exc
    assert error is None or error.error_class is ErrorClass.MALFORMED


@pytest.mark.parametrize(
    "value", ["0", "0.0000", 0, Decimal(0), "-1.5", "abc", True, "NaN", None, ""]
)
def test_prices_must_be_positive_numbers(value: object) -> None:
    assert _cls(price, value, "x")[0] is ErrorClass.MALFORMED


def test_price_quantizes_to_eight_places() -> None:
    assert price("187.4300", "x") == Decimal("187.43000000")
    assert price(Decimal("0.123456789"), "x") == Decimal("0.12345679")
    assert optional_positive(0, "x", "bid") is None
    assert optional_positive("-", "x", "bid") is None
    assert optional_positive("1.5", "x", "bid") == Decimal("1.5")


def test_epochs_in_each_unit_and_garbage() -> None:
    when = datetime(2024, 5, 10, 13, 30, tzinfo=UTC)
    assert epoch_to_utc(1715347800, "x") == when
    assert epoch_to_utc(1715347800000, "x", "ms") == when
    assert epoch_to_utc(Decimal("1715347800.5"), "x") == when.replace(microsecond=500000)
    assert _cls(epoch_to_utc, 0, "x")[1] == "bad_time"  # zero-filled
    assert _cls(epoch_to_utc, 1715347800000, "x")[1] == "bad_time"  # millis read as seconds
    assert _cls(epoch_to_utc, "soon", "x")[1] == "bad_time"
    assert _cls(epoch_to_utc, True, "x")[1] == "bad_time"
    assert _cls(epoch_to_utc, 10**30, "x")[1] == "bad_time"


def test_eastern_wall_clock_to_utc_follows_daylight_saving() -> None:
    # Standard time (UTC-5) in January, daylight time (UTC-4) in July.
    assert local_to_utc("2024-01-10 09:30:00", "av") == datetime(2024, 1, 10, 14, 30, tzinfo=UTC)
    assert local_to_utc("2024-07-10 09:30:00", "av") == datetime(2024, 7, 10, 13, 30, tzinfo=UTC)
    # The days around the 2024 switches (10 March, 3 November).
    assert local_to_utc("2024-03-08 16:00:00", "av") == datetime(2024, 3, 8, 21, 0, tzinfo=UTC)
    assert local_to_utc("2024-03-11 16:00:00", "av") == datetime(2024, 3, 11, 20, 0, tzinfo=UTC)
    assert local_to_utc("2024-11-01 16:00", "av") == datetime(2024, 11, 1, 20, 0, tzinfo=UTC)
    assert local_to_utc("2024-11-04 16:00", "av") == datetime(2024, 11, 4, 21, 0, tzinfo=UTC)
    # 02:30 on 10 March 2024 does not exist in New York; 01:30 on 3 November happens twice.
    assert _cls(local_to_utc, "2024-03-10 02:30:00", "av")[1] == "bad_time"
    assert local_to_utc("2024-11-03 01:30:00", "av") == datetime(2024, 11, 3, 5, 30, tzinfo=UTC)
    assert _cls(local_to_utc, "10/05/2024 09:30", "av")[1] == "bad_time"
    assert _cls(local_to_utc, 20240510, "av")[1] == "bad_time"


def test_zone_names() -> None:
    assert zone("US/Eastern", "av") is EASTERN
    assert zone(None, "av") is EASTERN
    assert zone("Europe/London", "av").key == "Europe/London"
    assert _cls(zone, "Mars/Olympus", "av")[1] == "bad_time"


def test_ids_come_from_content_not_provider() -> None:
    ts = datetime(2024, 5, 10, 13, 30, 0, 123000, tzinfo=UTC)
    a = trade_id("AAPL", ts, Decimal("187.43000000"), Decimal("100"))
    assert a == trade_id("AAPL", ts, Decimal("187.43"), Decimal("100.00000000"))
    assert a != trade_id("AAPL", ts, Decimal("187.43"), Decimal("101"))
    assert quote_id("AAPL", "d2024-05-10", Decimal("1.5"), None) == "AAPL:Q:d2024-05-10:1.5:-"
    assert len(trade_id("BTC-USD", ts, Decimal("9999999999999999.99999999"), Decimal("1e15"))) < 200


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (429, ErrorClass.THROTTLED),
        (401, ErrorClass.AUTH),
        (403, ErrorClass.AUTH),
        (404, ErrorClass.UNKNOWN_SYMBOL),
        (500, ErrorClass.TRANSIENT),
        (502, ErrorClass.TRANSIENT),
        (408, ErrorClass.TRANSIENT),
        (400, ErrorClass.PERMANENT),
        (410, ErrorClass.PERMANENT),
    ],
)
def test_status_classes(status: int, cls: ErrorClass) -> None:
    error = classify_status(status, "p", detail="x", retry_after=3.0)
    assert error is not None
    assert error.error_class is cls
    assert error.status == status
    assert classify_status(200, "p") is None


def test_urls_and_messages_lose_their_secrets() -> None:
    url = "https://www.alphavantage.co/query?function=GLOBAL_QUOTE&symbol=IBM&apikey=S3CRETKEY"
    assert "S3CRETKEY" not in scrub_url(url)
    assert "symbol=IBM" in scrub_url(url)
    assert "tok123" not in scrub_url("wss://ws.finnhub.io?token=tok123")
    assert "crumbX" not in scrub_url("https://q/v7/finance/quote?symbols=A&crumb=crumbX")
    assert scrub_url("https://finnhub.io/api/v1/quote") == "https://finnhub.io/api/v1/quote"
    text = "ConnectError for wss://h/?token=abcdef and key SECRETVALUE in body"
    out = scrub(text, ["SECRETVALUE"])
    assert "abcdef" not in out
    assert "SECRETVALUE" not in out


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=4, max_size=30))
def test_scrub_url_never_leaks_an_apikey(secret: str) -> None:
    from urllib.parse import quote

    url = f"https://h/query?symbol=A&apikey={quote(secret, safe='')}"
    assert f"apikey={quote(secret, safe='')}" not in scrub_url(url)


def test_limit_specs() -> None:
    specs = parse_limits("5/min, 25/day")
    assert [s.render() for s in specs] == ["5/min", "25/day"]
    assert specs[0].rate == pytest.approx(5 / 60)
    assert specs[1].burst == 25
    assert parse_limits("") == []
    for bad in ("5", "5/week", "-1/min", "x/min", "0/sec"):
        with pytest.raises(ValueError, match="bad rate limit"):
            parse_limits(bad)
