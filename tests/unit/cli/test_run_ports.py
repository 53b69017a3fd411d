"""`finstream run` names the roles' ports that something else holds, before it starts
any worker (a worker whose health port is taken exits at once, six times over)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from finstream.cli.run import run_command, taken_ports
from finstream.settings import get_settings
from finstream.testing.services import free_port


@pytest.fixture
def listening() -> Iterator[int]:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server.getsockname()[1]


def test_a_port_another_process_listens_on_is_named_with_its_role(listening: int) -> None:
    free = free_port()
    assert taken_ports("127.0.0.1", {"quotes": listening, "history": free}) == [
        f"{listening} (quotes)"
    ]


def test_a_port_left_in_time_wait_by_an_earlier_worker_is_not_taken() -> None:
    with socket.socket() as server:
        # As the workers' servers (aiohttp) bind: Linux lets a port in TIME_WAIT be
        # bound again only when both sockets ask for it.
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        accepted.close()  # the server's side closes first: its port holds a TIME_WAIT
        client.close()
    assert taken_ports("127.0.0.1", {"quotes": port}) == []


def test_run_refuses_to_start_and_says_which_ports_are_taken(
    listening: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FINSTREAM_RUN_BASE_PORT", str(listening))
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(run_command, ["--no-prepare", "--roles", "quotes"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 1, result.output
    assert f"ports in use on 127.0.0.1: {listening} (quotes)." in result.output
    assert "FINSTREAM_RUN_BASE_PORT" in result.output


def test_run_refuses_a_base_port_that_leaves_no_room_for_its_roles(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FINSTREAM_RUN_BASE_PORT", "65535")
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(run_command, ["--no-prepare", "--roles", "quotes,history"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 1, result.output
    assert "the last would be 65536; ports end at 65535" in result.output
