"""Templates: lookup and locale fallback, sandbox, escaping, strict variables, length limits."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finstream.domain.notify.fitting import fit_push, fit_sms, is_gsm7, sms_segments, truncate
from finstream.domain.notify.templates import (
    ChannelNotAvailable,
    Limits,
    MissingVariable,
    TemplateError,
    Templates,
    UnknownTemplate,
    locale_chain,
)
from finstream.resources import resource

TEMPLATES = Templates(resource("templates"))
ALERT = {"symbol": "AAPL", "price": "101.50", "description": "AAPL crossed above 100.00"}


def test_locale_chain() -> None:
    assert locale_chain("de-AT") == ["de-AT", "de", "en"]
    assert locale_chain("en") == ["en"]
    assert locale_chain(None) == ["en"]


def test_locale_falls_back_to_language_then_default() -> None:
    assert TEMPLATES.render("price_alert", "email", "de-AT", ALERT).locale == "de"
    assert TEMPLATES.render("price_alert", "email", "fr", ALERT).locale == "fr"
    assert TEMPLATES.render("price_alert", "inapp", "fr", ALERT).locale == "en"
    rendered = TEMPLATES.render("price_alert", "email", "ja", ALERT)
    assert rendered.locale == "en"
    assert rendered.subject == "Price alert: AAPL at 101.50"


def test_every_shipped_template_renders_on_every_channel_it_offers() -> None:
    data = {
        "title": "t",
        "body": "b",
        **ALERT,
        "count": "1",
        "category": "price_alert",
        "more": "0",
        "items_json": json.dumps([{"subject": "s", "text": "x", "at": "now"}]),
        "code": "123456",
        "minutes": "15",
    }
    rendered = 0
    for folder in sorted(p for p in resource("templates").iterdir() if not p.name.startswith("_")):
        for file in folder.glob("*.j2"):
            channel, locale, _ = file.name.split(".")
            out = TEMPLATES.render(folder.name, channel, locale, data)
            assert out.text
            assert out.locale == locale
            rendered += 1
    assert rendered >= 20


def test_missing_variable_is_an_error_never_a_blank() -> None:
    with pytest.raises(MissingVariable, match="price"):
        TEMPLATES.render("price_alert", "email", "en", {"symbol": "AAPL", "description": "d"})
    # Optional variables are guarded in the template and may be absent.
    out = TEMPLATES.render("price_alert", "email", "en", ALERT)
    assert "Your note" not in out.text
    out = TEMPLATES.render("price_alert", "email", "en", {**ALERT, "message": "sell!"})
    assert "Your note: sell!" in out.text


def test_unknown_template_and_missing_channel() -> None:
    with pytest.raises(UnknownTemplate):
        TEMPLATES.render("no_such_template", "email", "en", {})
    with pytest.raises(UnknownTemplate):
        TEMPLATES.render("../templates", "email", "en", {})
    with pytest.raises(UnknownTemplate):
        TEMPLATES.render("_layouts", "email", "en", {})
    with pytest.raises(ChannelNotAvailable):
        TEMPLATES.render("welcome", "fax", "en", {"title": "t", "body": "b"})


def test_email_html_is_escaped_and_text_is_not() -> None:
    data = {"title": "Hi <b>you</b>", "body": "<script>alert(1)</script> & more"}
    out = TEMPLATES.render("welcome", "email", "en", data)
    assert out.html is not None
    assert "<script>" not in out.html
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in out.html
    assert "<title>Hi &lt;b&gt;you&lt;/b&gt;</title>" in out.html
    assert out.text.startswith("<script>alert(1)</script> & more")
    assert out.subject == "Hi <b>you</b>"


def test_subject_is_one_line() -> None:
    out = TEMPLATES.render(
        "welcome", "email", "en", {"title": "a\r\nBcc: x@example.com", "body": "b"}
    )
    assert out.subject == "a Bcc: x@example.com"


def test_sandbox_refuses_unsafe_attribute_access(tmp_path: Path) -> None:
    (tmp_path / "_layouts").mkdir()
    (tmp_path / "_layouts" / "inapp.j2").write_text(
        (resource("templates") / "_layouts" / "inapp.j2").read_text()
    )
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "inapp.en.j2").write_text(
        '{% extends "_layouts/inapp.j2" %}{% block subject %}x{% endblock %}'
        "{% block text %}{{ title.__class__.__mro__[1].__subclasses__() }}{% endblock %}"
    )
    templates = Templates(tmp_path)
    with pytest.raises(TemplateError):
        templates.render("evil", "inapp", "en", {"title": "t"})


def test_data_cannot_shadow_the_renderers_variables() -> None:
    out = TEMPLATES.render("welcome", "inapp", "en", {"title": "t", "body": "b", "part": "html"})
    assert out.text == "b"


def test_digest_lists_items_from_json() -> None:
    items = [{"subject": f"AAPL {i}", "text": f"moved {i}", "at": "x"} for i in range(3)]
    data = {"count": "5", "more": "2", "category": "price_alert", "items_json": json.dumps(items)}
    out = TEMPLATES.render("digest", "email", "en", data)
    assert out.subject == "5 price alert notifications"
    assert "* AAPL 2: moved 2" in out.text
    assert "and 2 more" in out.text
    with pytest.raises(TemplateError):
        TEMPLATES.render("digest", "email", "en", {**data, "items_json": "{not json"})


# -- length limits ----------------------------------------------------------------------------


def test_sms_stays_within_its_segments() -> None:
    long = "word " * 200
    out = TEMPLATES.render("welcome", "sms", "en", {"title": "t", "body": long})
    assert sms_segments(out.text) <= 3
    assert out.text.endswith("...")
    assert is_gsm7(out.text)
    unicode_long = "Kurs gestiegen 📈 " * 40
    fitted = fit_sms(unicode_long, 2)
    assert sms_segments(fitted) <= 2
    assert fit_sms("short", 1) == "short"


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=0, max_size=800), st.integers(1, 4))
def test_fit_sms_property(text: str, segments: int) -> None:
    fitted = fit_sms(text, segments)
    assert sms_segments(fitted) <= segments
    if sms_segments(text) <= segments:
        assert fitted == text


def test_push_fits_its_payload() -> None:
    limits = Limits(push_payload_bytes=500)
    title, body, data = fit_push("T" * 300, "B" * 2000, {"k": "v" * 100, "big": "x" * 1000}, limits)
    assert title is not None
    assert len(title) <= limits.push_title_chars
    assert len(title.encode()) + len(body.encode()) <= 500
    assert "big" not in data


@given(st.text(max_size=300), st.integers(1, 120))
def test_truncate_property(text: str, limit: int) -> None:
    out = truncate(text, limit)
    assert len(out) <= limit
    if len(text) <= limit:
        assert out == text


# -- overlay folders, reloads, refused files, missing variables (issue 16) ------------------


def _write(path: Path, text: str, stamp: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.utime(path, ns=(stamp, stamp))


def test_overlay_is_read_again_only_when_the_interval_passed_and_a_file_changed(
    tmp_path: Path,
) -> None:
    now = [0.0]
    overlay = tmp_path / "overlay"
    _write(overlay / "note" / "inapp.en.j2", "{% block subject %}{% endblock %}{{ a }}", 10**18)
    t = Templates(resource("templates"), overlay=overlay, reload_seconds=5.0, clock=lambda: now[0])
    assert t.render("note", "inapp", "en", {"a": "one"}).text == "one"
    _write(overlay / "note" / "inapp.en.j2", "{{ a }}!", 10**18 + 10**9)
    now[0] = 4.0
    assert t.render("note", "inapp", "en", {"a": "one"}).text == "one"  # not looked yet
    now[0] = 5.5
    assert t.render("note", "inapp", "en", {"a": "one"}).text == "one!"
    generation = t.generation
    now[0] = 20.0
    assert not t.maybe_reload()  # looked, nothing changed: nothing recompiled
    assert t.generation == generation


def test_a_new_file_that_does_not_parse_is_refused_with_its_line_and_not_served(
    tmp_path: Path,
) -> None:
    _write(tmp_path / "bad" / "sms.en.j2", "line one\n{% if x %}\nno end", 10**18)
    t = Templates(resource("templates"), overlay=tmp_path)
    assert [(e.name, e.line) for e in t.errors] == [("bad/sms.en.j2", 3)]
    assert str(t.errors[0]).startswith(f"{tmp_path / 'bad' / 'sms.en.j2'}:3: ")
    assert not t.exists("bad")
    assert t.exists("welcome")  # the rest loads


def test_missing_variables_names_every_strictly_used_one_and_ignores_is_defined() -> None:
    t = Templates(resource("templates"))
    assert t.missing_variables("price_alert", "email", "en", {}) == [
        "description",
        "price",
        "symbol",
    ]
    full = {"symbol": "A", "price": "1", "description": "d"}
    assert t.missing_variables("price_alert", "email", "en", full) == []
    assert t.channels("price_alert") == ["email", "push", "sms", "inapp"]
    with pytest.raises(UnknownTemplate):
        t.missing_variables("nope", "email", "en", {})
