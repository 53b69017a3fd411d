"""The API as `make run` starts it: worker processes, live quotes from the simulator
through Kafka and the quotes agent to `finstream api stream`, rules through the
compacted topic and the statestore role, and no token in any log."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import httpx
from websockets.sync.client import connect as ws_connect

from tests.support.services import TestEnv, free_port, wait_until, workers


def test_stream_rules_and_logs_through_worker_processes(
    env: TestEnv, log_dir: Path, tmp_path: Path
) -> None:
    api_port = free_port()
    # FINSTREAM_ENV stays "dev" (the default): development keys, as `make run` uses them.
    overrides = {
        "stack_dir": str(tmp_path),
        "api_port": str(api_port),
        "sim_rate": "40",
        "sim_symbols": "AAPL,MSFT",
        "api_ws_auth_timeout_seconds": "1",
    }
    cli_env = env.env(**overrides)

    def cli(*args: str, timeout: float = 60) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "finstream.cli", "api", *args],
            env=cli_env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    with workers(env, log_dir, "statestore", "api", "quotes", "simulator", **overrides) as procs:
        # The command `make run` prints: live quotes, authenticated with a dev token.
        frames = [json.loads(line) for line in cli("stream", "AAPL", "--count", "3").splitlines()]
        kinds = [f["type"] for f in frames]
        assert kinds[:2] == ["welcome", "subscribed"]
        quotes = [f for f in frames if f["type"] == "quote"]
        assert len(quotes) == 3
        assert {q["symbol"] for q in quotes} == {"AAPL"}
        assert all(Decimal(q["data"]["price"]) > 0 for q in quotes)

        base = f"http://127.0.0.1:{api_port}"
        token = cli("token", "--sub", "e2e-user").strip()
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=base, timeout=10) as http:
            assert http.get("/readyz").status_code == 200
            created = http.post(
                "/v1/users/me/rules",
                json={"symbol": "MSFT", "condition": "GREATER_THAN", "value": "1"},
                headers=headers,
            )
            assert created.status_code == 201, created.text
            assert http.get("/v1/quotes/AAPL", headers=headers).json()["symbol"] == "AAPL"
            refused = http.get("/v1/users/me/rules", headers={"Authorization": f"Bearer {token}x"})
            assert refused.status_code == 401

            # A rule written to the topic by someone else (the CLI, another
            # service) reaches the API through the statestore role.
            now = datetime.now(UTC)
            env.produce_records(
                "alerts.rules",
                "AlertRule",
                [
                    (
                        "r-from-topic",
                        {
                            "rule_id": "r-from-topic",
                            "user_id": "e2e-user",
                            "symbol": "AAPL",
                            "condition": "LESS_THAN",
                            "value": Decimal("10"),
                            "frequency": "ONLY_ONCE",
                            "enabled": True,
                            "created_at": now,
                            "updated_at": now,
                        },
                    )
                ],
            )

            def listed() -> set[str]:
                items = http.get("/v1/users/me/rules", headers=headers).json()["items"]
                return {r["rule_id"] for r in items}

            wait_until(
                lambda: "r-from-topic" in listed(), timeout=30, message="rule via statestore"
            )
            assert created.json()["rule_id"] in listed()

        # A client that puts its token in the URL is refused, and the URL, which
        # uvicorn logs, has the token scrubbed.
        with ws_connect(f"ws://127.0.0.1:{api_port}/v1/stream?access_token={token}") as ws:
            refusal = json.loads(ws.recv(timeout=5))
            assert refusal["code"] == "unauthorized"
        api_worker = next(p for p in procs if p.role == "api")
    assert api_worker.proc is not None
    assert api_worker.proc.returncode == 0, api_worker.log_tail()
    log_text = api_worker.log_path.read_text()
    assert "api listening" in log_text
    for secret in (token, f"{token}x", token.split(".")[2]):
        assert secret not in log_text, "a token reached the log"
