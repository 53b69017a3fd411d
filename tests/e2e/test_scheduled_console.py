"""The console's Scheduled card in a real browser (headless Chromium, Playwright): a user
signs in, sees their held notifications, reschedules one and cancels another, and the
commands reach notify.scheduled.commands; the page logs no errors."""

from __future__ import annotations

import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from finstream.api.deps import Resources
from finstream.domain.notify.scheduled import Item
from finstream.domain.time import to_micros, utcnow
from finstream.stores.read_models import ScheduledStore
from tests.e2e.test_make_run import CHROMIUM, CHROMIUM_ARGS
from tests.support.api import Keys, api_server, api_settings
from tests.support.services import TestEnv

pytestmark = pytest.mark.e2e

VENDOR = Path(__file__).parents[2] / "src/finstream/api/console/vendor"


async def put(res: Resources, user: str, item_id: str, minutes: int, kind: str = "REQUEST") -> None:
    due = utcnow() + timedelta(minutes=minutes)
    reason = "digest" if kind == "DIGEST" else "quiet_hours"
    item = Item(item_id, user, kind, reason, to_micros(due), "account", "welcome", count=3)
    value = res.topic("notify.scheduled.items").encode(item.record("HELD", utcnow()))
    await ScheduledStore(res.redis, res.settings, res.codec).put(user, item_id, value)


def commands(env: TestEnv, count: int) -> list[dict[str, Any]]:
    found = env.consume_all("notify.scheduled.commands", min_count=count, timeout=30)
    return [env.codec.decode(m.value(), "ScheduleCommand") for m in found]


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="make tools installs Debian's chromium")
@pytest.mark.skipif(not VENDOR.is_dir(), reason="make console copies the chart library")
async def test_console_lists_reschedules_and_cancels(env: TestEnv, tmp_path: Path) -> None:
    from playwright.async_api import async_playwright

    keys = Keys.create(tmp_path / "jwks")
    settings = api_settings(env.settings, keys)
    errors: list[str] = []
    profile = tempfile.mkdtemp(prefix="console-profile-")
    async with api_server(settings) as (ws_url, res):
        base = ws_url.replace("ws://", "http://")
        await put(res, "lea", "r-move", 30)
        await put(res, "lea", "r-drop", 60)
        await put(res, "lea", "digest-abc", 90, kind="DIGEST")
        async with async_playwright() as p:
            context = await p.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
            )
            page = await context.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            await page.goto(f"{base}/console/")
            await page.fill("#login-token", keys.token("lea"))
            await page.click("#login-form button")
            await page.wait_for_selector("#scheduled li[data-item='r-drop']", timeout=30_000)
            items = await page.eval_on_selector_all(
                "#scheduled li", "els => els.map(e => e.dataset.item)"
            )
            assert items == ["r-move", "r-drop", "digest-abc"]  # soonest first
            assert "3 item(s)" in await page.inner_text("#scheduled li[data-item='digest-abc']")
            assert await page.get_attribute("#scheduled-user", "readonly") is not None

            new_time = (utcnow() + timedelta(hours=5)).astimezone()
            local = new_time.strftime("%Y-%m-%dT%H:%M")
            await page.fill("#scheduled li[data-item='r-move'] input.when", local)
            await page.click("#scheduled li[data-item='r-move'] button.reschedule")
            await page.wait_for_selector("#scheduled-message:has-text('reschedule of r-move')")
            await page.click("#scheduled li[data-item='r-drop'] button.cancel")
            await page.wait_for_selector("#scheduled-message:has-text('cancel of r-drop')")
            await context.close()
    sent = {c["item_id"]: c for c in commands(env, 2)}
    assert sent["r-drop"]["action"] == "CANCEL"
    assert sent["r-drop"]["requested_by"] == "user:lea"
    moved = sent["r-move"]
    assert moved["action"] == "RESCHEDULE"
    assert moved["deliver_at"].strftime("%Y-%m-%dT%H:%M") == new_time.astimezone(
        moved["deliver_at"].tzinfo
    ).strftime("%Y-%m-%dT%H:%M")
    assert not errors, errors
